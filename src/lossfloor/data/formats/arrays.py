"""Arrays: ``.npz`` archives (read whole) and ``.npy`` files (memory-mapped, or read by rows
with positioned reads), in the layout of ``items.canonical_array``."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from lossfloor.data.formats.items import Items, RawData, canonical_array, check_items, check_labels
from lossfloor.data.formats.latents import gaussian_items
from lossfloor.errors import ParameterError, UserError


def load_npz(path: Path, *, key: str | None, labels_key: str | None, limit: int | None) -> RawData:
    """Read array ``key`` (default ``x``, or the only one) and labels (default ``y``); without
    ``key``, arrays ``mean`` and ``std`` are Gaussian items (``latents.gaussian_items``)."""
    npz = _np_load(path, ".npz")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array (an .npy file); rename it to .npy")
    with npz:
        keys = list(npz.files)
        if not keys:
            raise UserError(f"{path} holds no arrays; save the data with np.savez(path, x=...)")
        available = ", ".join(keys)
        gaussian = key is None and {"mean", "std"} <= set(keys)
        if gaussian:
            key = "mean"
        elif key is None:
            if "x" not in keys and len(keys) > 1:
                raise ParameterError(
                    "key", None, f"{path} has arrays {available} but none named x; choose one"
                )
            key = "x" if "x" in keys else keys[0]
        elif key not in keys:
            raise ParameterError("key", key, f"{path} has no such array; available: {available}")
        if labels_key is None:
            labels_key = "y" if "y" in keys and key != "y" else None
        elif labels_key not in keys:
            raise ParameterError(
                "labels_key", labels_key, f"{path} has no such array; available: {available}"
            )
        arr = _npz_member(npz, key, path)
        std = _npz_member(npz, "std", path) if gaussian else None
        labels = None if labels_key is None else _npz_member(npz, labels_key, path)
    check_items(arr.shape, f"{path}[{key}]")
    if labels is not None:
        labels = check_labels(labels, len(arr), f"{path}[{labels_key}]")[:limit]
    if std is not None:
        mean, std = gaussian_items(arr, std, str(path), limit)
        return RawData(mean, labels, "float", std)
    values, scale = canonical_array(arr[:limit], f"{path}[{key}]")
    return RawData(values, labels, scale)


def _np_load(
    path: Path, kind: str, mmap_mode: Literal["r"] | None = None
) -> np.ndarray | np.lib.npyio.NpzFile:
    """``np.load`` without pickles; a file that is neither an .npy array nor an .npz archive
    (numpy would offer to unpickle it) is called what it is."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(
                f"{path} is not a valid {kind} file (neither an .npy array nor an .npz archive)"
            ) from None
        raise UserError(f"{path} is not a readable {kind} file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable {kind} file ({exc})") from None


def _npz_member(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"{path}: cannot read array {key!r} ({exc})") from None


class ArrayItems(Items):
    """Rows of an array (an ``.npy`` memory map, a cached named source): each read converts only
    its rows to the canonical layout and dtype (``canonical_array``; an integer array's range is
    checked on the rows read)."""

    def __init__(
        self, values: np.ndarray, scale: str | None, labels: np.ndarray | None, where: str
    ) -> None:
        check_items(values.shape, where)
        first, found = canonical_array(np.asarray(values[:1]), where)
        self.values, self.where, self.labels = values, where, labels
        self.n, self.shape, self.scale = len(values), first.shape[1:], scale or found
        self._dtype = first.dtype

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self._canonical(np.array(self.values[lo:hi]))

    def take(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._canonical(self.values[np.asarray(idx, dtype=np.int64)])

    def _canonical(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.empty((0, *self.shape), dtype=self._dtype)
        values, _ = canonical_array(rows, self.where)
        return values


def open_npy(path: Path, *, limit: int | None) -> ArrayItems:
    """The first ``limit`` rows of an ``.npy`` file, memory-mapped (nothing read yet)."""
    arr = _np_load(path, ".npy", mmap_mode="r")
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise UserError(f"{path} is an .npz archive; rename it to .npz")
    check_items(arr.shape, str(path))
    return ArrayItems(arr[:limit], None, None, str(path))


class NpyFileItems(Items):
    """Rows of an ``.npy`` file read with positioned reads (``os.pread``) at the offsets its
    header gives, nothing mapped: the process holds only the rows it reads. (A memory map's
    touched pages count in the process's resident memory until unmapped, and the whole map in
    its address space, so a process capped below the file's size could not map it.)"""

    def __init__(self, path: Path, limit: int | None) -> None:
        try:
            with path.open("rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{path} is not a readable .npy file ({exc})") from None
        if dtype.hasobject:
            raise UserError(f"{path} holds Python objects; give uint8 or float data")
        if fortran and len(shape) > 1:
            raise UserError(f"{path} is in Fortran order; save it C-ordered (np.ascontiguousarray)")
        check_items(shape, str(path))
        self.path, self.where, self.labels, self._dtype = path, str(path), None, dtype
        self._row = dtype.itemsize * math.prod(shape[1:])
        self._shape = shape[1:]
        self.n = shape[0] if limit is None else min(limit, shape[0])
        first, self.scale = canonical_array(self._rows(0, 1), self.where)
        self.shape, self._canonical_dtype = first.shape[1:], first.dtype

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as stored (raw layout)."""
        with self.path.open("rb") as f:
            buf = os.pread(f.fileno(), (hi - lo) * self._row, self._offset + lo * self._row)
        if len(buf) != (hi - lo) * self._row:
            raise UserError(f"{self.where}: the file is truncated (rows {lo}…{hi - 1} missing)")
        return np.frombuffer(buf, dtype=self._dtype).reshape(hi - lo, *self._shape)

    def _canonical(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.empty((0, *self.shape), dtype=self._canonical_dtype)
        return canonical_array(rows, self.where)[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self._canonical(self._rows(lo, hi) if hi > lo else self._rows(0, 0))

    def take(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and not (idx.min() >= 0 and idx.max() < self.n):
            raise IndexError(f"rows {idx.min()}…{idx.max()} of {self.n}")
        raw = np.empty((len(idx), *self._shape), dtype=self._dtype)
        with self.path.open("rb") as f:
            for i, row in enumerate(idx.tolist()):
                buf = os.pread(f.fileno(), self._row, self._offset + row * self._row)
                raw[i] = np.frombuffer(buf, dtype=self._dtype).reshape(self._shape)
        return self._canonical(raw)


def load_npy(path: Path, *, limit: int | None) -> RawData:
    """Memory-map the file and read only the first ``limit`` rows."""
    return open_npy(path, limit=limit).raw()
