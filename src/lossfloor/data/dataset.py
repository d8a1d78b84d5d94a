"""The ``Dataset`` every command works on, and ``load_dataset`` that resolves a ``--data`` spec."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lossfloor.data.formats import (
    ArrayItems,
    Items,
    NpyFileItems,
    RawData,
    load_edm_zip,
    load_image_folder,
    load_npy,
    load_npz,
    open_edm_zip,
    open_image_folder,
)
from lossfloor.data.sources import NAMED_SOURCES
from lossfloor.errors import ParameterError, UserError

FILE_KINDS = "FILE.npz, FILE.npy, an image FOLDER (PNG/JPEG) or an EDM .zip"
# Divisor d of each scale: x/d − 1 (uint8 0..255 and digits 0..16 both map onto [−1, 1]).
_DIVISORS = {"uint8": 127.5, "digits": 8.0}


@dataclass(frozen=True)
class Dataset:
    """Items in [−1, 1] (N×C×H×W images or N×D vectors), optional labels, a fingerprint."""

    name: str
    x: torch.Tensor
    labels: torch.Tensor | None
    sha256: str
    xflip: bool

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim < 2:
            raise ValueError(f"Dataset.x must be float32 of shape N×..., got {self.x.dtype}")
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or self.labels.shape != (len(self.x),)
        ):
            raise ValueError("Dataset.labels must be int64 of shape N")

    @property
    def n(self) -> int:
        """Number of items (mirrored copies included)."""
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item."""
        return tuple(self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Number of elements per item."""
        return math.prod(self.shape)

    @property
    def num_classes(self) -> int | None:
        """Largest label + 1, or None without labels."""
        return None if self.labels is None else int(self.labels.max()) + 1

    def flat(self) -> torch.Tensor:
        """The items as an N×D tensor."""
        return self.x.reshape(self.n, self.dim)

    def describe(self) -> dict:
        """What identifies this dataset in a result file."""
        return {
            "name": self.name,
            "n": self.n,
            "shape": list(self.shape),
            "sha256": self.sha256,
            "xflip": self.xflip,
            "labels": self.labels is not None,
            "num_classes": self.num_classes,
        }


class Fingerprint:
    """``fingerprint`` of an array of ``shape`` (all its rows) fed in consecutive blocks of
    rows: sha256 is sequential, so the blocks' bytes in order give the digest of the whole."""

    def __init__(self, scale: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        shape = tuple(int(s) for s in shape)
        self._digest = hashlib.sha256(
            f"lossfloor-data-v1|{scale}|{self.dtype.str}|{shape}|".encode()
        )

    def update(self, rows: np.ndarray) -> None:
        """The next rows (their little-endian bytes)."""
        self._digest.update(np.ascontiguousarray(rows, dtype=self.dtype).data.cast("B"))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def fingerprint(values: np.ndarray, scale: str) -> str:
    """sha256 of an unscaled array: its scale rule, dtype, shape and little-endian bytes (the
    one fingerprint of a dataset, in memory or read in chunks: ``Fingerprint``)."""
    digest = Fingerprint(scale, values.dtype, values.shape)
    digest.update(values)
    return digest.hexdigest()


def scale_to_unit(values: np.ndarray, divisor: float) -> torch.Tensor:
    """float32 ``values/divisor − 1``, bit for bit numpy's ``values.astype(float32) / divisor − 1``
    (each float32 operation rounded once), on torch's threads. ``values`` (possibly a read-only
    memory map) are only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(values)
    return source.to(torch.float32).div_(divisor).sub_(1)


def to_unit(values: np.ndarray, scale: str, where: str) -> torch.Tensor:
    """float32 items in [−1, 1] of unscaled ``values`` (``RawData.scale``): pixel values as
    ``scale_to_unit``, floats as they are (UserError where they hold NaN or ±inf in float32)."""
    if scale != "float":
        return scale_to_unit(values, _DIVISORS[scale])
    with np.errstate(over="ignore"):  # out-of-range float64 becomes inf, reported below
        x = torch.from_numpy(np.array(values, dtype=np.float32))
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    if nan or inf:
        raise UserError(
            f"{where}: the data holds {nan} NaN and {inf} infinite values (in float32); "
            "remove or replace them"
        )
    return x


def mean_and_variance(x: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Mean of all elements, and the per-element variance across items (1/N) averaged over
    elements — the optimal per-element x0 loss as σ → ∞. Accumulated in float64, in chunks
    converted into one reused buffer."""
    flat = x.reshape(len(x), -1)
    n = flat.shape[0]
    buf = torch.empty(min(chunk, n), flat.shape[1], dtype=torch.float64)

    def chunks() -> Iterator[torch.Tensor]:
        for i in range(0, n, chunk):
            rows = flat[i : i + chunk]
            yield buf[: len(rows)].copy_(rows)

    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    for c in chunks():
        total += c.sum(0)
    mu = total / n
    squares = torch.zeros_like(mu)
    for c in chunks():
        squares += c.sub_(mu).square_().sum(0)
    return float(mu.mean()), float((squares / n).mean())


def _reader(spec: str) -> tuple[Callable[..., RawData], bool]:
    """The function that reads ``spec`` (called with ``limit=``) and whether it is an .npz."""
    if spec in NAMED_SOURCES:
        return NAMED_SOURCES[spec], False
    path = Path(spec).expanduser()
    if path.is_dir():
        return partial(load_image_folder, path), False
    if path.is_file():
        readers: dict[str, Callable[..., RawData]] = {
            ".npz": load_npz,
            ".npy": load_npy,
            ".zip": load_edm_zip,
        }
        suffix = path.suffix.lower()
        if suffix not in readers:
            raise UserError(
                f"{spec}: unsupported file kind {suffix or '(none)'}; give {FILE_KINDS}"
            )
        return partial(readers[suffix], path), suffix == ".npz"
    if path.suffix or "/" in spec or spec.startswith(("~", ".")):
        raise UserError(f"file or folder not found: {spec}")
    names = ", ".join(NAMED_SOURCES)
    raise UserError(f"unknown dataset {spec!r}: use one of {names}, or a path to {FILE_KINDS}")


def open_items(spec: str, *, limit: int | None = None) -> Items:
    """The items of ``spec`` read by rows (``formats.Items``), nothing decoded yet: a named
    source's cached memory map, an ``.npy`` memory map, an image folder or an EDM zip. An
    ``.npz`` is refused (its arrays are read whole)."""
    if limit is not None and limit < 1:
        raise ParameterError("limit", limit, "must be at least 1 (leave it out to use all items)")
    if spec in NAMED_SOURCES:
        raw = NAMED_SOURCES[spec](limit)
        return ArrayItems(raw.values, raw.scale, raw.labels, spec)
    read, is_npz = _reader(spec)
    if is_npz:
        raise UserError(
            f"{spec}: an .npz is read whole; to stream it, save its array as .npy "
            "(np.save) and give that"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return open_image_folder(path, limit=limit)
    if path.suffix.lower() == ".npy":
        return NpyFileItems(path, limit)
    return open_edm_zip(path, limit=limit)


def load_dataset(
    spec: str,
    *,
    limit: int | None = None,
    xflip: bool = False,
    key: str | None = None,
    labels_key: str | None = None,
) -> Dataset:
    """Load a named source or a file, take the first ``limit`` items, scale to [−1, 1] and
    optionally append horizontally mirrored copies (labels duplicated)."""
    if limit is not None and limit < 1:
        raise ParameterError("limit", limit, "must be at least 1 (leave it out to use all items)")
    read, is_npz = _reader(spec)
    if is_npz:
        raw = read(limit=limit, key=key, labels_key=labels_key)
    elif key is not None or labels_key is not None:
        param, value = ("key", key) if key is not None else ("labels_key", labels_key)
        raise ParameterError(param, value, f"applies only to .npz files, not to {spec}")
    else:
        raw = read(limit=limit)
    values = raw.values
    x = to_unit(values, raw.scale, spec)
    labels = None if raw.labels is None else torch.from_numpy(raw.labels.astype(np.int64))
    if xflip:
        if x.ndim != 4:
            raise ParameterError("xflip", True, f"mirrors images, but {spec} holds N×D vectors")
        x = torch.cat([x, x.flip(-1)])
        labels = None if labels is None else torch.cat([labels, labels])
    return Dataset(spec, x, labels, fingerprint(values, raw.scale), xflip)
