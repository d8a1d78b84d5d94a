"""Latents back to images (``lossfloor.vae``): the inverse of the latent transform, ``lossfloor
sample --vae`` and ``lossfloor fid`` on decoded latents, bad VAE folders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lossfloor.cli
from lossfloor.data import load_dataset
from lossfloor.data.encode import load_vae
from lossfloor.data.formats.latents import LatentTransform, latent_transform
from lossfloor.training import TrainConfig, train
from lossfloor.vae import decode, to_raw

pytestmark = pytest.mark.usefixtures("one_thread")
U = 2.0**-24  # float32 unit roundoff
SCALE, BIAS = "0.5,2,-1,0.25", "0.1,-0.3,0,2"


def _tiny_vae():
    """A random AutoencoderKL: 1×28×28 images ↔ 4×7×7 latents (two down/upsamplings)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=28,
    ).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> Path:
    """A 1-step run on Gaussian items 4×7×7 read with a per-channel scale and bias."""
    tmp = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((8, 4, 7, 7)).astype(np.float32)
    np.savez(tmp / "l.npz", mean=mean, std=np.full_like(mean, 0.2))
    scale, bias = ([float(v) for v in t.split(",")] for t in (SCALE, BIAS))
    ds = load_dataset(str(tmp / "l.npz"), latent_scale=scale, latent_bias=bias)
    config = TrainConfig(steps=1, batch=4, model="tiny", warmup=1)
    train(config, ds, tmp / "run", progress=False)
    return tmp / "run"


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(lossfloor.cli, "SUBCOMMANDS", ["sample", "fid"])
    code = lossfloor.cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _one_line_error(monkeypatch, capsys, *argv: str) -> str:
    code, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ----- the inverse transform ----------------------------------------------------------------
def test_to_raw_is_x_minus_bias_over_scale_per_channel():
    """Against float64 (x − b)/s: float32 rounds the subtraction and the division once each,
    so the relative error is at most 2u + u² (u = 2⁻²⁴)."""
    t = latent_transform(None, [0.5, 2.0, -1.0, 0.25], [0.1, -0.3, 0.0, 2.0])
    assert t is not None
    x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 3
    got = to_raw(x, t).double()
    s = torch.tensor([0.5, 2.0, -1.0, 0.25], dtype=torch.float64).reshape(1, 4, 1, 1)
    b = torch.from_numpy(t.bias).double().reshape(1, 4, 1, 1)
    expected = (x.double() - b) / s
    assert ((got - expected).abs() <= (2 * U + U * U) * expected.abs()).all()
    assert torch.equal(to_raw(x, None), x)  # nothing recorded: the VAE's own units


def test_the_inverse_undoes_the_transform_the_data_was_read_through():
    """raw → apply (final units, as the data were read) → to_raw gives raw back, within the
    rounding of the four float32 operations: |r·s| u + |r·s + b| u in apply, carried through
    1/|s|, plus 2u + u² of the result's own size."""
    t = latent_transform("sd-vae")
    assert t is not None
    raw = (np.random.default_rng(2).standard_normal((6, 4, 2, 2)) * 4).astype(np.float32)
    final, _ = t.apply(raw, np.zeros_like(raw), "test")
    back = to_raw(torch.from_numpy(final), t).double().numpy()
    s, b = (v.astype(np.float64).reshape(1, 4, 1, 1) for v in (t.scale, t.bias))
    r = raw.astype(np.float64)
    bound = (np.abs(r * s) * U + np.abs(r * s + b) * U) * (1 + U) / np.abs(s) + 3 * U * np.abs(r)
    assert np.all(np.abs(back - r) <= bound)
    record = json.loads(json.dumps(t.to_json()))  # as a run's config.json keeps it
    again = LatentTransform.from_json(record)
    assert np.array_equal(again.scale, t.scale) and np.array_equal(again.bias, t.bias)


def test_decode_hands_the_vae_raw_latents_and_clips_its_images():
    seen = []

    def linear_decoder(raw: torch.Tensor) -> SimpleNamespace:
        seen.append(raw)
        return SimpleNamespace(sample=2 * raw[:, :1])  # a known linear "VAE"

    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4), decode=linear_decoder)
    t = latent_transform(None, [0.5], [1.0])
    x = torch.linspace(-2, 3, 5 * 4 * 2 * 2).reshape(5, 4, 2, 2)
    images = decode(vae, x, t, batch=2)
    assert [len(r) for r in seen] == [2, 2, 1]
    assert torch.equal(torch.cat(seen), (x - 1) / 0.5)
    assert torch.equal(images, (2 * (x[:, :1] - 1) / 0.5).clamp(-1, 1))


# ----- lossfloor sample --vae -----------------------------------------------------------------
@pytest.mark.slow
def test_sample_vae_writes_the_decoded_images_of_the_runs_latents(
    latent_run, vae_dir, tmp_path, monkeypatch, capsys
):
    common = ("sample", "--model", latent_run, "--n", "3", "--steps", "3", "--no-progress")
    assert _cli(monkeypatch, capsys, *common, "--out-npz", tmp_path / "lat.npz")[0] == 0
    assert _cli(monkeypatch, capsys, *common, "--vae", vae_dir, "--out-npz", tmp_path / "img.npz",
                "--out-grid", tmp_path / "img.png")[0] == 0  # fmt: skip
    with np.load(tmp_path / "lat.npz") as z:
        latents, lat_meta = z["x"], json.loads(str(z["meta"]))
    with np.load(tmp_path / "img.npz") as z:
        images, img_meta = z["x"], json.loads(str(z["meta"]))
    assert latents.shape == (3, 4, 7, 7) and lat_meta["latent"] is True
    assert images.shape == (3, 1, 28, 28) and img_meta["vae"] == str(vae_dir)
    assert "latent" not in img_meta and (tmp_path / "img.png").is_file()
    # the images are the VAE's decoding of (x − bias)/scale, the run's recorded transform
    s = torch.tensor([float(v) for v in SCALE.split(",")]).reshape(1, 4, 1, 1)
    b = torch.tensor([float(v) for v in BIAS.split(",")]).reshape(1, 4, 1, 1)
    with torch.no_grad():
        # the VAE as the command loads it: its kernels (weights without grad) round alike
        expected = load_vae(vae_dir).decode((torch.from_numpy(latents) - b) / s).sample.clamp(-1, 1)
    assert torch.equal(torch.from_numpy(images), expected)  # the same computation
    assert images.min() >= -1 and images.max() <= 1


def test_sample_of_a_latent_run_refuses_a_grid_without_vae(latent_run, tmp_path, monkeypatch,
                                                           capsys):  # fmt: skip
    err = _one_line_error(monkeypatch, capsys, "sample", "--model", latent_run, "--n", "2",
                          "--out-grid", tmp_path / "g.png")  # fmt: skip
    assert "latents, not images" in err and "--vae" in err


@pytest.mark.parametrize("kind", ["missing", "empty", "unet", "broken"])
def test_a_folder_that_is_not_an_autoencoderkl_is_one_line(
    latent_run, tmp_path, monkeypatch, capsys, kind
):
    folder = tmp_path / kind
    if kind != "missing":
        folder.mkdir()
    if kind == "unet":
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    if kind == "broken":  # the right class name, no weights
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    err = _one_line_error(monkeypatch, capsys, "sample", "--model", latent_run, "--n", "2",
                          "--vae", folder, "--out-npz", tmp_path / "s.npz")  # fmt: skip
    assert f"--vae {folder}" in err
    assert not (tmp_path / "s.npz").exists()


# ----- lossfloor fid on decoded latents -------------------------------------------------------
def _pixels(tmp_path: Path) -> str:
    images = np.random.default_rng(3).integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "pixels.npz", x=images)
    return str(tmp_path / "pixels.npz")


def _latent_samples(tmp_path: Path) -> Path:
    """A sample file as ``lossfloor sample`` writes it for a run on latents (without --vae)."""
    x = np.random.default_rng(4).standard_normal((6, 4, 7, 7)).astype(np.float32)
    t = latent_transform(
        None, [float(v) for v in SCALE.split(",")], [float(v) for v in BIAS.split(",")]
    )
    assert t is not None
    meta = {"latent": True, "data": {"gaussian_items": True, "latent_transform": t.to_json()}}
    np.savez(tmp_path / "lat.npz", x=x, meta=np.asarray(json.dumps(meta)))
    return tmp_path / "lat.npz"


def test_fid_refuses_latent_samples_without_a_vae(tmp_path, monkeypatch, capsys):
    err = _one_line_error(monkeypatch, capsys, "fid", "--samples", _latent_samples(tmp_path),
                          "--data", _pixels(tmp_path), "--feature", "classifier")  # fmt: skip
    assert "are VAE latents, not images" in err and "--vae" in err


def test_fid_refuses_images_with_a_vae_and_latent_reference_data(
    vae_dir, tmp_path, monkeypatch, capsys
):
    images = tmp_path / "img.npz"
    np.savez(images, x=np.zeros((4, 1, 28, 28), np.float32), meta=np.asarray(json.dumps({})))
    err = _one_line_error(monkeypatch, capsys, "fid", "--samples", images, "--data",
                          _pixels(tmp_path), "--vae", vae_dir)  # fmt: skip
    assert "images already" in err
    np.savez(tmp_path / "g.npz", mean=np.zeros((4, 4, 7, 7), np.float32),
             std=np.ones((4, 4, 7, 7), np.float32))  # fmt: skip
    err = _one_line_error(monkeypatch, capsys, "fid", "--samples", _latent_samples(tmp_path),
                          "--data", tmp_path / "g.npz", "--vae", vae_dir)  # fmt: skip
    assert "FID measures images" in err


@pytest.mark.slow
def test_fid_with_vae_is_the_fid_of_the_decoded_images(vae_dir, tmp_path, monkeypatch, capsys):
    import lossfloor.evaluation.fid as fid

    latents = _latent_samples(tmp_path)
    with np.load(latents) as z:
        x = torch.from_numpy(z["x"])
    t = latent_transform(None, *([float(v) for v in a.split(",")] for a in (SCALE, BIAS)))
    decoded = decode(load_vae(vae_dir), x, t)
    np.savez(tmp_path / "dec.npz", samples=decoded.numpy())
    measured = []
    evaluate = fid.evaluate

    def spy(images, *args, **kwargs):
        measured.append(images)
        return evaluate(images, *args, **kwargs)

    monkeypatch.setattr(fid, "evaluate", spy)
    opts = ("--data", _pixels(tmp_path), "--feature", "classifier", "--kid-subsets", "2")
    out = {}
    for name, argv in (("vae", (latents, "--vae", vae_dir)), ("dec", (tmp_path / "dec.npz",))):
        code, _ = _cli(monkeypatch, capsys, "fid", "--samples", *argv, *opts, "--quiet", "--out",
                       tmp_path / f"{name}.json")  # fmt: skip
        assert code == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())["scores"]["classifier"]
    assert torch.equal(measured[0], decoded) and torch.equal(measured[1], decoded)
    assert out["vae"]["n_samples"] == 6
    # the same images; the classifier's float32 convolutions may round differently with the
    # tensors' memory alignment (a few float32 ulps of the features, ~1e-7 relative), so the
    # distances agree to that order, not bit for bit
    assert out["vae"]["frechet_distance"] == pytest.approx(out["dec"]["frechet_distance"], rel=1e-6)
