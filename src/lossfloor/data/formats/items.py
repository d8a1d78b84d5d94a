"""What every reader gives: :class:`RawData` (items in canonical layout, unscaled, labels) and
:class:`Items` (the same read by rows), and the layout and dtype rules of arrays.

Array layout (``.npz``/``.npy``, and the rows of any array): N×H×W becomes N×1×H×W; N×H×W×C
with C in {1, 3, 4} and H, W > 4 is read as channels-last and becomes N×C×H×W; other N×C×H×W
arrays and N×D vectors are kept. uint8 arrays are pixel values (scaled later as x/127.5 − 1);
other integer arrays are accepted when every value lies in 0..255 and are then treated as
uint8; float arrays are used as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lossfloor.errors import UserError


class RawData(NamedTuple):
    """Items before scaling, in canonical layout, already cut to ``limit``."""

    values: np.ndarray  # N×C×H×W or N×D; uint8 pixel values or floats
    labels: np.ndarray | None  # int64, shape N
    scale: str  # "uint8": x/127.5 − 1, "digits": x/8 − 1, "float": as is
    std: np.ndarray | None = None  # Gaussian items (``latents``): values are the means


def check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    """Labels as int64 of shape N; they must be non-negative integers."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise UserError(f"{where}: labels have shape {labels.shape} but the data has {n} items")
    if (
        labels.dtype.kind == "f"
        and np.all(np.isfinite(labels))
        and np.all(labels == np.rint(labels))
    ):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise UserError(f"{where}: labels must be >= 0, found {labels.min()}")
    return labels.astype(np.int64)


def check_items(shape: tuple[int, ...], where: str) -> None:
    """The shape of an array of items: at least one item, each with elements."""
    if len(shape) == 0:
        raise UserError(f"{where}: the array is a scalar (0-d); give an array of items (N×...)")
    if shape[0] == 0:
        raise UserError(f"{where}: the data is empty (0 items); give a file with at least one item")
    if 0 in shape:
        raise UserError(f"{where}: each item has shape {shape[1:]} with no elements")


def canonical_array(arr: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """Apply the layout and dtype rules above; return the array and its scale name."""
    check_items(arr.shape, where)
    kind = arr.dtype.kind
    if kind in "iu" and arr.dtype != np.uint8:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 255:
            raise UserError(
                f"{where}: integer data ({arr.dtype}) spans {lo}..{hi}; "
                "give uint8 pixel values 0..255 or float data"
            )
        arr = arr.astype(np.uint8)
    elif kind not in "uf":
        raise UserError(f"{where}: unsupported dtype {arr.dtype}; give uint8 or float data")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[3] in (1, 3, 4) and arr.shape[1] > 4 and arr.shape[2] > 4:
        arr = arr.transpose(0, 3, 1, 2)
    elif arr.ndim not in (2, 4):
        raise UserError(
            f"{where}: array of shape {arr.shape} is not N×D, N×H×W, N×C×H×W or N×H×W×C"
        )
    return np.ascontiguousarray(arr), ("uint8" if arr.dtype == np.uint8 else "float")


class Items(ABC):
    """A file's items in canonical layout, unscaled, read by rows: ``read(lo, hi)`` and
    ``take(idx)`` return only the rows asked for, so a caller bounds its memory by what it asks
    (``data.chunked``); the loaders (``arrays``, ``images``) read all rows at once through the
    same calls."""

    n: int  # number of items (after ``limit``)
    shape: tuple[int, ...]  # one item's canonical shape
    scale: str  # "uint8" | "float" (RawData.scale)
    labels: np.ndarray | None  # int64, shape n
    where: str  # the file, for messages

    @abstractmethod
    def take(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """The items at ``idx`` (any order, repeats allowed), canonical, unscaled."""

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Items [lo, hi), canonical, unscaled."""
        return self.take(np.arange(lo, hi))

    def raw(self) -> RawData:
        """Every item, in memory."""
        return RawData(self.read(0, self.n), self.labels, self.scale)

    def close(self) -> None:  # noqa: B027 (most items hold nothing to close)
        """Release what the items hold open (a zip)."""
