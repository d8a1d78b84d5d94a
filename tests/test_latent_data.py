"""Gaussian items (VAE latents with a std): the .npz and EDM2 latent-zip readers, the transform
to final units, ``lossfloor data``'s description, and the one-line refusals of what does not
handle them yet."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.data.dataset import open_items
from lossfloor.errors import UserError

# EDM2's StabilityVAEEncoder (training/encoders.py), written out again here: the reader's
# constants are checked against these, not against themselves.
RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15], dtype=np.float32)
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)


def _raw_latents(n: int = 6, c: int = 4, hw: int = 4, seed: int = 0):
    """Raw (VAE-unit) means and stds, float32, N×C×H×W."""
    rng = np.random.default_rng(seed)
    mean = (RAW_MEAN[None, :c, None, None] + 3 * rng.standard_normal((n, c, hw, hw))).astype(
        np.float32
    )
    std = rng.uniform(0.01, 0.5, size=(n, c, hw, hw)).astype(np.float32)
    return mean, std


def _edm_zip(path: Path, mean: np.ndarray, std: np.ndarray, labels: list[int] | None) -> Path:
    """A latent zip as EDM2's ``dataset_tool.py encode`` writes it: per item
    ``NNNNN/img-mean-std-NNNNNNNN.npy`` (mean and std concatenated on channels, np.save) and
    dataset.json with ``[[fname, label], ...]`` or null."""
    entries = []
    with zipfile.ZipFile(path, "w") as zf:
        for idx in range(len(mean)):
            idx_str = f"{idx:08d}"
            fname = f"{idx_str[:5]}/img-mean-std-{idx_str}.npy"
            buf = io.BytesIO()
            np.save(buf, np.concatenate([mean[idx], std[idx]]))
            zf.writestr(fname, buf.getvalue())
            entries.append([fname, labels[idx]] if labels is not None else None)
        meta = {"labels": entries if all(e is not None for e in entries) else None}
        zf.writestr("dataset.json", json.dumps(meta))
    return path


def _sd_vae(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's final units in float32: scale = 0.5/raw_std, bias = −raw_mean·scale."""
    scale = np.float32(0.5) / RAW_STD
    bias = np.float32(0) - RAW_MEAN * scale
    return mean * scale[:, None, None] + bias[:, None, None], std * np.abs(scale)[:, None, None]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, *argv: str) -> str:
    code, _, err = _cli(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lossfloor: error: "), err
    return err


# ---------------------------------------------------------------- readers and the transform


def test_edm2_latent_zip_with_sd_vae_equals_the_npz_of_the_same_data_in_final_units(tmp_path):
    mean, std = _raw_latents()
    labels = [3, 1, 4, 1, 5, 9]
    zpath = _edm_zip(tmp_path / "latents.zip", mean, std, labels)
    fmean, fstd = _sd_vae(mean, std)
    np.savez(tmp_path / "final.npz", mean=fmean, std=fstd, y=np.array(labels))
    z = load_dataset(str(zpath), encoder="sd-vae")
    n = load_dataset(str(tmp_path / "final.npz"))
    assert z.std is not None and n.std is not None
    # the same float32 operations (one rounding each) on both sides: bitwise equal
    assert torch.equal(z.x, n.x) and torch.equal(z.std, n.std)
    assert torch.equal(z.x, torch.from_numpy(fmean)) and torch.equal(z.std, torch.from_numpy(fstd))
    assert z.labels is not None and z.labels.tolist() == labels
    assert z.sha256 == n.sha256  # fingerprinted in final units, however stored
    # against float64 arithmetic: within the float32 roundings of the product and the sum
    # (|x| ≤ max|m·s| + |b|; each of 3 operations errs ≤ 2⁻²⁴ relative)
    s64 = 0.5 / RAW_STD.astype(np.float64)
    exact = mean * s64[:, None, None] - (RAW_MEAN * s64)[:, None, None]
    bound = (
        4 * 2.0**-24 * (np.abs(mean * s64[:, None, None]) + np.abs(RAW_MEAN * s64)[:, None, None])
    )
    assert np.all(np.abs(z.x.numpy() - exact) <= bound)


def test_latent_scale_and_bias_per_channel_or_one_for_all(tmp_path):
    mean, std = _raw_latents(c=2)
    zpath = _edm_zip(tmp_path / "l.zip", mean, std, None)
    one = load_dataset(str(zpath), latent_scale=[2.0], latent_bias=[1.0])
    assert torch.equal(one.x, torch.from_numpy(mean * np.float32(2) + np.float32(1)))
    per = load_dataset(str(zpath), latent_scale=[0.5, -3.0], latent_bias=[0.0, 2.0])
    scale = np.array([0.5, -3.0], np.float32)[:, None, None]
    bias = np.array([0.0, 2.0], np.float32)[:, None, None]
    assert torch.equal(per.x, torch.from_numpy(mean * scale + bias))
    assert per.std is not None and torch.equal(per.std, torch.from_numpy(std * np.abs(scale)))
    raw = load_dataset(str(zpath), encoder="raw")
    assert torch.equal(raw.x, torch.from_numpy(mean)) and raw.labels is None


def test_key_mean_of_a_latent_zip_gives_the_final_means_as_points(tmp_path):
    mean, std = _raw_latents()
    zpath = _edm_zip(tmp_path / "l.zip", mean, std, None)
    points = load_dataset(str(zpath), encoder="sd-vae", key="mean")
    assert points.std is None and torch.equal(points.x, torch.from_numpy(_sd_vae(mean, std)[0]))


def test_xflip_mirrors_means_and_stds_alike(tmp_path):
    mean, std = _raw_latents(n=3)
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    ds = load_dataset(str(tmp_path / "g.npz"), xflip=True)
    assert ds.n == 6 and ds.std is not None
    assert torch.equal(ds.x[3:], torch.from_numpy(mean).flip(-1))
    assert torch.equal(ds.std[3:], torch.from_numpy(std).flip(-1))


def test_fingerprints_differ_when_only_the_std_differs(tmp_path):
    mean, std = _raw_latents()
    np.savez(tmp_path / "a.npz", mean=mean, std=std)
    std2 = std.copy()
    std2[0, 0, 0, 0] = np.nextafter(std2[0, 0, 0, 0], np.float32(1))
    np.savez(tmp_path / "b.npz", mean=mean, std=std2)
    a, b = load_dataset(str(tmp_path / "a.npz")), load_dataset(str(tmp_path / "b.npz"))
    assert torch.equal(a.x, b.x) and a.sha256 != b.sha256


def test_key_given_reads_an_array_of_a_mean_std_npz_as_points(tmp_path):
    mean, std = _raw_latents()
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    ds = load_dataset(str(tmp_path / "g.npz"), key="mean")
    assert ds.std is None and torch.equal(ds.x, torch.from_numpy(mean))


# ---------------------------------------------------------------- lossfloor data


def test_data_describes_variance_of_means_posterior_variance_and_their_sum(tmp_path, capsys):
    mean, std = _raw_latents(n=9)
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    out_json = tmp_path / "d.json"
    code, out, _ = _cli(capsys, "data", "--data", str(tmp_path / "g.npz"), "--json", str(out_json))
    assert code == 0
    info = json.loads(out_json.read_text())
    m64, s64 = mean.astype(np.float64), std.astype(np.float64)
    between = float(m64.var(axis=0).mean())  # per-element variance across items (1/N)
    within = float((s64**2).mean())
    assert info["gaussian_items"] is True and info["shape"] == [4, 4, 4]
    # float64 sums of float32 data: only summation-order rounding differs (≪ 1e-12 relative)
    assert info["variance_of_means_per_element"] == pytest.approx(between, rel=1e-12)
    assert info["posterior_variance_per_element"] == pytest.approx(within, rel=1e-12)
    assert info["variance_per_element"] == pytest.approx(between + within, rel=1e-12)
    assert "4 channels" in out and "per element in total (J* as σ → ∞)" in out


# ---------------------------------------------------------------- refusals (one line, exit 2)


@pytest.fixture
def gauss(tmp_path) -> str:
    mean, std = _raw_latents(n=8)
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    return str(tmp_path / "g.npz")


@pytest.mark.parametrize(
    "argv",
    [
        ["floor", "--sigmas", "0.5,1", "--out", "{t}/f.json"],
        ["estimate", "--sigmas", "0.5", "--out", "{t}/c.json", "--sources"],
        ["diagnose", "--model", "optimal", "--sigmas", "0.5", "--out", "{t}/d.json", "--heldout"],
    ],
    ids=["floor", "estimate-sources", "diagnose-heldout"],
)
@pytest.mark.parametrize("gaussian_train", [True, False])
def test_held_out_sets_of_another_kind_of_item_are_refused_in_one_line(
    gauss, tmp_path, capsys, argv, gaussian_train
):
    """A held-out loss bounds J* of the held-out items' distribution: Gaussian items against
    points (either way round) are refused before any work."""
    points = tmp_path / "p.npz"
    np.savez(points, x=np.load(gauss)["mean"])
    train, held = (gauss, str(points)) if gaussian_train else (str(points), gauss)
    argv = [a.format(t=tmp_path) for a in argv]
    if argv[0] == "floor":
        argv += ["--heldout"]
    says = _one_line_error(capsys, *argv, held, "--data", train)
    kinds = ("Gaussian items", "points") if gaussian_train else ("points", "Gaussian items")
    assert f"the training set holds {kinds[0]}" in says and kinds[1] in says
    assert not list(tmp_path.glob("*.json"))


def test_a_latent_zip_does_not_stream(tmp_path, capsys):
    mean, std = _raw_latents()
    zpath = _edm_zip(tmp_path / "l.zip", mean, std, None)
    with pytest.raises(UserError, match="is read whole, not by rows; leave out --stream"):
        open_items(str(zpath))
    argv = ["estimate", "--data", str(zpath), "--encoder", "sd-vae", "--stream", "--sigmas",
            "0.5", "--out", str(tmp_path / "c.json")]  # fmt: skip
    assert "an EDM2 latent zip (Gaussian items) is read whole" in _one_line_error(capsys, *argv)


# ---------------------------------------------------------------- bad input (one line, exit 2)


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    np.savez(tmp_path / "bad.npz", **arrays)
    return str(tmp_path / "bad.npz")


def test_bad_gaussian_items_are_refused_in_one_line(tmp_path, capsys):
    mean, std = _raw_latents()
    negative, nan = std.copy(), std.copy()
    negative[1, 0, 0, 0] = -0.1
    nan[2, 1, 0, 0] = np.nan
    cases = [
        (dict(mean=mean, std=negative), "std holds 1 negative values"),
        (dict(mean=mean, std=nan), "std holds 1 NaN or infinite values"),
        (dict(mean=mean, std=std[:, :2]), "std has shape"),
    ]
    for arrays, message in cases:
        assert message in _one_line_error(capsys, "data", "--data", _npz(tmp_path, **arrays))


def test_an_odd_channel_count_in_a_latent_zip_is_refused(tmp_path, capsys):
    mean, std = _raw_latents(c=2)
    zpath = _edm_zip(tmp_path / "l.zip", mean, std[:, :1], None)  # 3 channels
    err = _one_line_error(capsys, "data", "--data", str(zpath), "--encoder", "raw")
    assert "3 channels, an odd count" in err


def test_a_latent_zip_without_a_transform_is_refused(tmp_path, capsys):
    mean, std = _raw_latents()
    zpath = _edm_zip(tmp_path / "l.zip", mean, std, None)
    err = _one_line_error(capsys, "data", "--data", str(zpath))
    assert "raw VAE latents; give --encoder sd-vae" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--latent-scale", "1,2,3"], "--latent-scale 1,2,3: "),
        (["--latent-bias", "0,0"], "--latent-bias 0,0: "),
        (["--latent-scale", "nan"], "must be finite"),
        (["--latent-bias", "inf"], "must be finite"),
        (["--latent-scale", "0"], "non-zero"),
        (["--latent-scale", "x"], "not a comma-separated list of numbers"),
        (["--encoder", "raw", "--latent-scale", "2"], "not both"),
    ],
)
def test_bad_scale_or_bias_is_refused_in_one_line(tmp_path, capsys, options, message):
    mean, std = _raw_latents()
    zpath = _edm_zip(tmp_path / "l.zip", mean, std, None)
    assert message in _one_line_error(capsys, "data", "--data", str(zpath), *options)


def test_a_transform_of_data_that_is_not_latent_is_refused(tmp_path, capsys):
    path = _npz(tmp_path, x=np.zeros((3, 4), np.float32))
    for options in (["--encoder", "sd-vae"], ["--latent-bias", "1"]):
        err = _one_line_error(capsys, "data", "--data", path, *options)
        assert f"{options[0]}: applies only to latent data" in err
