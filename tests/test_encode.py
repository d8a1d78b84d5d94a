"""``lossfloor encode`` (``data/encode.py``): pixels → a VAE's posterior mean and std in EDM2's
latent zip, read back by lossfloor and by a re-implementation of EDM2's loader; resume after an
interruption; the one-line refusals."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.data.encode import encode_dataset, latent_member, open_encoder
from lossfloor.errors import Interrupted, UserError

N, C, H = 10, 1, 8  # ten 1×8×8 images: batches of 4 leave a partial last batch


def _tiny_vae(folder: Path, in_channels: int = 1, seed: int = 0) -> Path:
    """A random diffusers AutoencoderKL (2 blocks: downsampling ×2, 2 latent channels),
    saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=H,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    with torch.no_grad():  # a std that varies: logvar's half of the conv's output biased
        vae.quant_conv.bias[2:] += torch.tensor([-1.0, 0.5])
    vae.save_pretrained(folder)
    return folder


def _images(path: Path, labels: bool = True, n: int = N, channels: int = C, side: int = H) -> Path:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)
    arrays = {"x": x, **({"y": rng.integers(0, 5, size=n)} if labels else {})}
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return _tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def _reference(vae_dir: Path, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent_dist mean and std, called directly on the same batches (eval, without
    gradients: torch picks other kernels for weights that require grad, 1 ulp apart)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    means, stds = [], []
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            d = vae.encode(x[lo : lo + batch]).latent_dist
            means.append(d.mean)
            stds.append(torch.exp(0.5 * d.logvar))  # std = exp(½ logvar), diffusers' definition
    return torch.cat(means), torch.cat(stds)


def test_the_zip_reads_back_as_the_vaes_means_and_stds_with_the_labels(tmp_path, vae_dir):
    data = _images(tmp_path / "img.npz")
    out = tmp_path / "lat.zip"
    summary = encode_dataset(str(data), str(vae_dir), out, batch=4, device="cpu", progress=False)
    assert summary.n == N and summary.latent_shape == (4, H // 2, H // 2)
    assert not (tmp_path / "lat.zip.partial").exists()
    pixels = load_dataset(str(data))
    mean, std = _reference(vae_dir, pixels.x, 4)
    assert float(std.min()) > 0 and float(std.std()) > 0  # the std is no constant
    back = load_dataset(str(out), encoder="raw")
    assert torch.equal(back.x, mean) and torch.equal(back.std, std)
    assert torch.equal(back.labels, pixels.labels)


def test_the_zip_follows_edm2s_layout_and_edm2s_loader_reads_it(tmp_path, vae_dir):
    data = _images(tmp_path / "img.npz")
    out = tmp_path / "lat.zip"
    encode_dataset(str(data), str(vae_dir), out, batch=3, device="cpu", progress=False)
    labels = np.load(data)["y"]
    # EDM2's dataset_tool.py encode: idx_str = f'{idx:08d}';
    # archive_fname = f'{idx_str[:5]}/img-mean-std-{idx_str}.npy'
    expected = [f"{f'{i:08d}'[:5]}/img-mean-std-{i:08d}.npy" for i in range(N)]
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == [*expected, "dataset.json"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        meta = json.loads(zf.read("dataset.json"))
        arrays = [np.load(io.BytesIO(zf.read(name)), allow_pickle=False) for name in expected]
    assert meta["labels"] == [[name, int(v)] for name, v in zip(expected, labels, strict=True)]
    assert all(a.dtype == np.float32 and a.shape == (4, H // 2, H // 2) for a in arrays)
    assert meta["vae"]["scaling_factor"] == 0.5 and meta["vae"]["shift_factor"] == 0.25
    assert meta["vae"]["pixel_range"] == [-1.0, 1.0]
    images, edm_labels = _edm2_image_folder_dataset(out)
    mean, std = _reference(vae_dir, load_dataset(str(data)).x, 3)
    assert np.array_equal(images, torch.cat([mean, std], 1).numpy())
    assert edm_labels.dtype == np.int64 and np.array_equal(edm_labels, labels)
    stats = meta["latent_statistics"]  # per channel, against numpy in float64
    m, s = mean.double().numpy(), std.double().numpy()
    np.testing.assert_allclose(stats["mean_of_means"], m.mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["std_of_means"], m.std((0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["mean_of_stds"], s.mean((0, 2, 3)), rtol=1e-12)
    both = np.sqrt(m.var((0, 2, 3)) + (s**2).mean((0, 2, 3)))
    np.testing.assert_allclose(stats["std_of_samples"], both, rtol=1e-9)


def _edm2_image_folder_dataset(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's ImageFolderDataset on a zip (training/dataset.py), its steps written out: the
    sorted names with a supported extension, each np.load'ed and reshaped to (-1, H, W), and
    the labels of dataset.json's ``labels`` (the only key it reads) by name, int64."""
    from PIL import Image

    Image.init()
    with zipfile.ZipFile(path) as z:
        all_fnames = set(z.namelist())
        supported = Image.EXTENSION.keys() | {".npy"}
        fnames = sorted(f for f in all_fnames if Path(f).suffix.lower() in supported)
        images = []
        for fname in fnames:
            with z.open(fname, "r") as f:
                image = np.load(f)
                images.append(image.reshape(-1, *image.shape[-2:]))
        with z.open("dataset.json", "r") as f:
            labels = dict(json.load(f)["labels"])
    raw = np.array([labels[f.replace("\\", "/")] for f in fnames])
    return np.stack(images), raw.astype({1: np.int64, 2: np.float32}[raw.ndim])


def test_member_names_follow_edm2_beyond_one_folder():
    for i in (0, 999, 1000, 12345, 99_999_999):
        s = f"{i:08d}"
        assert latent_member(i) == f"{s[:5]}/img-mean-std-{s}.npy"
    assert latent_member(12345) == "00012/img-mean-std-00012345.npy"  # folder = i // 1000


def test_unlabelled_data_gives_null_labels(tmp_path, vae_dir):
    data = _images(tmp_path / "img.npz", labels=False)
    out = tmp_path / "lat.zip"
    encode_dataset(str(data), str(vae_dir), out, batch=4, device="cpu", progress=False)
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("dataset.json"))["labels"] is None
    assert load_dataset(str(out), encoder="raw").labels is None


class _Interrupting:
    """An encoder that raises KeyboardInterrupt (Ctrl-C) on its call number ``at``."""

    def __init__(self, encoder, at: int) -> None:
        self.encoder, self.at, self.calls = encoder, at, 0

    def __call__(self, pixels):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.encoder.encode(pixels)


def test_an_interrupted_encode_resumes_to_the_same_bytes(tmp_path, vae_dir):
    from dataclasses import replace

    data = str(_images(tmp_path / "img.npz"))
    whole = tmp_path / "whole.zip"
    encode_dataset(data, str(vae_dir), whole, batch=3, device="cpu", progress=False)
    out = tmp_path / "resumed.zip"
    encoder = open_encoder(str(vae_dir), "cpu")
    stop = _Interrupting(encoder, at=3)
    with pytest.raises(Interrupted, match="continues"):
        encode_dataset(data, replace(encoder, encode=stop), out, batch=3, progress=False)
    assert not out.exists()
    kept = sorted(p.name for p in (tmp_path / "resumed.zip.partial").iterdir())
    assert kept == ["batch-00000000.npz", "batch-00000001.npz", "key.json"]
    again = _Interrupting(encoder, at=0)  # counts the calls, never stops
    summary = encode_dataset(data, replace(encoder, encode=again), out, batch=3, progress=False)
    assert again.calls == 2 and summary.resumed == 6  # batches 2 and 3 (4 images) encoded
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "resumed.zip.partial").exists()


def test_a_rerun_gives_the_same_zip_byte_for_byte(tmp_path, vae_dir):
    data = str(_images(tmp_path / "img.npz"))
    for name in ("a.zip", "b.zip"):
        encode_dataset(data, str(vae_dir), tmp_path / name, batch=4, progress=False)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def _one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lossfloor: error: "), err
    return lines[0]


def test_the_cli_encodes_resumes_and_refuses_a_partial_of_other_options(tmp_path, capsys, vae_dir):
    data = str(_images(tmp_path / "img.npz"))
    out = tmp_path / "lat.zip"
    partial = tmp_path / "lat.zip.partial"
    partial.mkdir()
    (partial / "key.json").write_text(json.dumps({"batch": 99}))
    argv = ["encode", "--data", data, "--vae", str(vae_dir), "--out", str(out), "--quiet"]
    line = _one_line(capsys, [*argv, "--batch", "4"])
    assert "--restart" in line and "another VAE, batch size" in line, line
    assert main([*argv, "--batch", "4", "--restart"]) == 0
    printed = capsys.readouterr().out
    assert "encoded 10 images (1×8×8)" in printed and "2×... " not in printed
    assert "--latent-scale 0.5 --latent-bias -0.125" in printed  # diffusers' (z − shift)·scale
    back = load_dataset(str(out), latent_scale=[0.5], latent_bias=[-0.125])
    raw = load_dataset(str(out), encoder="raw")
    assert torch.equal(back.x, raw.x * 0.5 - 0.125)
    assert not partial.exists()


def _module(tmp_path: Path, monkeypatch, body: str) -> str:
    """A module ``lf_encoders`` in ``tmp_path`` (the working directory) holding ``body``."""
    (tmp_path / "lf_encoders.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "lf_encoders", raising=False)
    return "python:lf_encoders"


ENCODERS = """
import numpy as np
import torch

seen = []

def pool(x):  # mean: 2×2 average per channel; std: |mean|/10 + 0.01
    seen.append(x.clone())
    m = torch.nn.functional.avg_pool2d(x, 2)
    return m, m.abs() / 10 + 0.01

def as_numpy(x):
    m = x[:, :, ::2, ::2].numpy()
    return m, np.full_like(m, 0.5)

def one(x):
    return x

def shapes(x):
    return x, x[:, :, :2]

def negative(x):
    return x, -x.abs() - 1

def nan(x):
    return x, x * float("nan")

def ints(x):
    return x.long(), x.long()

def boom(x):
    raise RuntimeError("out of memory")
"""


def test_a_python_callable_encodes_and_sees_the_pixel_range(tmp_path, capsys, monkeypatch):
    spec = _module(tmp_path, monkeypatch, ENCODERS)
    data = str(_images(tmp_path / "img.npz"))
    for pixel_range in ("signed", "unit"):
        out = tmp_path / f"{pixel_range}.zip"
        argv = ["encode", "--data", data, "--vae", f"{spec}:pool", "--out", str(out),
                "--batch", "4", "--pixel-range", pixel_range, "--quiet"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        import lf_encoders

        seen = torch.cat(lf_encoders.seen)
        lf_encoders.seen.clear()
        values = torch.from_numpy(np.load(data)["x"].astype(np.float32))
        expected = values / 255 if pixel_range == "unit" else load_dataset(data).x
        assert torch.equal(seen, expected)  # [0, 1]: v/255 exactly, as EDM2's encoder
        back = load_dataset(str(out), encoder="raw")
        pooled = torch.nn.functional.avg_pool2d(expected, 2)
        assert torch.equal(back.x, pooled) and torch.equal(back.std, pooled.abs() / 10 + 0.01)
    assert main(["encode", "--data", data, "--vae", f"{spec}:as_numpy", "--out",
                 str(tmp_path / "np.zip"), "--quiet"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("one", "returned Tensor; return (mean, std)"),
        ("shapes", "returned mean (10, 1, 8, 8) and std (10, 1, 2, 8) for 10 images"),
        ("negative", "returned a negative std"),
        ("nan", "returned NaN or infinite values"),
        ("ints", "its mean is torch.int64; return float tensors"),
        ("boom", "boom() raised RuntimeError: out of memory"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_a_bad_callable_is_one_line(tmp_path, capsys, monkeypatch, name, says):
    spec = _module(tmp_path, monkeypatch, ENCODERS)
    data = str(_images(tmp_path / "img.npz"))
    line = _one_line(capsys, ["encode", "--data", data, "--vae", f"{spec}:{name}", "--out",
                              str(tmp_path / "o.zip"), "--quiet"])  # fmt: skip
    assert says in line, line
    assert not (tmp_path / "o.zip").exists()


def test_bad_inputs_are_one_line_each(tmp_path, capsys, vae_dir):
    from diffusers import UNet2DModel

    data = str(_images(tmp_path / "img.npz"))
    rgb = str(_images(tmp_path / "rgb.npz", channels=3))
    odd = str(_images(tmp_path / "odd.npz", side=9))
    np.savez(tmp_path / "vec.npz", x=np.zeros((4, 6), np.float32))
    np.savez(tmp_path / "lat.npz", mean=np.zeros((4, 2, 2, 2)), std=np.ones((4, 2, 2, 2)))
    unet = tmp_path / "unet"
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                layers_per_block=1).save_pretrained(unet)  # fmt: skip
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    broken = tmp_path / "broken"
    _tiny_vae(broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    out = str(tmp_path / "o.zip")
    cases = [
        ([data, str(tmp_path / "nope")], "--vae", "not found"),
        ([data, str(tmp_path / "file")], "--vae", "is a file"),
        ([data, str(tmp_path / "empty")], "--vae", "holds no config.json"),
        ([data, str(unet)], "--vae", "config.json describes UNet2DModel, not an AutoencoderKL"),
        ([data, str(broken)], "--vae", "loading the AutoencoderKL failed"),
        ([data, "python:lf_no_such_module:f"], "vae", "no module named 'lf_no_such_module'"),
        ([data, "python:json"], "vae", "expected python:MODULE:CALLABLE"),
        ([rgb, str(vae_dir)], "rgb.npz", "3-channel images but the VAE takes 1 channels"),
        ([odd, str(vae_dir)], "odd.npz", "9×9 images, but the VAE downsamples by 2"),
        ([str(tmp_path / "vec.npz"), str(vae_dir)], "vec.npz", "encode takes images"),
        ([str(tmp_path / "lat.npz"), str(vae_dir)], "lat.npz", "holds latents"),
    ]
    for (spec, vae), where, says in cases:
        line = _one_line(capsys, ["encode", "--data", spec, "--vae", vae, "--out", out])
        assert where in line and says in line, line
    line = _one_line(capsys, ["encode", "--data", data, "--vae", str(vae_dir), "--out",
                              str(tmp_path / "o.npz")])  # fmt: skip
    assert "--out" in line and "give a .zip file" in line, line
    line = _one_line(capsys, ["encode", "--data", data, "--vae", str(vae_dir), "--out", out,
                              "--batch", "0"])  # fmt: skip
    assert "--batch 0: must be at least 1" in line, line
    assert not (tmp_path / "o.zip").exists() and not (tmp_path / "o.zip.partial").exists()


def test_an_edm2_latent_zip_is_no_pixel_data(tmp_path, capsys, vae_dir):
    data = str(_images(tmp_path / "img.npz"))
    lat = tmp_path / "lat.zip"
    encode_dataset(data, str(vae_dir), lat, batch=4, progress=False)
    with pytest.raises(UserError, match="is an EDM2 latent zip; encode takes pixels"):
        encode_dataset(str(lat), str(vae_dir), tmp_path / "again.zip", progress=False)


def test_a_saved_pipelines_vae_folder_is_found(tmp_path, vae_dir):
    import shutil

    pipeline = tmp_path / "pipe"
    shutil.copytree(vae_dir, pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    assert open_encoder(str(pipeline), "cpu").identity == open_encoder(str(vae_dir)).identity


def test_latents_of_two_shapes_are_one_line(tmp_path, capsys, monkeypatch):
    spec = _module(
        tmp_path,
        monkeypatch,
        ENCODERS
        + """
calls = []

def growing(x):
    calls.append(1)
    m = torch.zeros(len(x), 1, len(calls), 2)
    return m, m + 1
""",
    )
    data = str(_images(tmp_path / "img.npz"))
    line = _one_line(capsys, ["encode", "--data", data, "--vae", f"{spec}:growing", "--out",
                              str(tmp_path / "o.zip"), "--batch", "4", "--quiet"])  # fmt: skip
    assert "2×1×2 latents for batch 0 but 2×2×2 for batch 1" in line, line
    assert not (tmp_path / "o.zip").exists()
