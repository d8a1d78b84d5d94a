"""User data files: ``.npz``, ``.npy`` (memory-mapped), image folders and EDM-style zips.

Every reader returns a :class:`RawData`: the first ``limit`` items in canonical layout
(N×C×H×W images or N×D vectors), unscaled, with optional int64 labels.

Array layout (``.npz``/``.npy``): N×H×W becomes N×1×H×W; N×H×W×C with C in {1, 3, 4} and
H, W > 4 is read as channels-last and becomes N×C×H×W; other N×C×H×W arrays and N×D vectors
are kept. uint8 arrays are pixel values (scaled later as x/127.5 − 1); other integer arrays are
accepted when every value lies in 0..255 and are then treated as uint8; float arrays are used
as they are.

Image folders: every PNG/JPEG below the folder, sorted by relative path. Grayscale images give
1 channel, colour ones 3 (an alpha channel is dropped); all images must share one size.
Labels: from a ``dataset.json`` in the folder if present (EDM's format), else, when every image
sits in a subfolder, the first-level subfolder names sorted alphabetically give class ids 0, 1, …
(``cat/``, ``dog/`` → 0, 1); otherwise none.

EDM zips (as EDM's ``dataset_tool.py`` writes them): the PNG/JPEG members sorted by name, labels
only from ``dataset.json`` (``{"labels": [[filename, label], ...]}`` or ``{"labels": null}``);
EDM's numbered subfolders inside the zip are not classes.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from lossfloor.errors import ParameterError, UserError

if TYPE_CHECKING:  # PIL loads only when images are decoded
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LABELS_FILE = "dataset.json"


class RawData(NamedTuple):
    """Items before scaling, in canonical layout, already cut to ``limit``."""

    values: np.ndarray  # N×C×H×W or N×D; uint8 pixel values or floats
    labels: np.ndarray | None  # int64, shape N
    scale: str  # "uint8": x/127.5 − 1, "digits": x/8 − 1, "float": as is


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


def _check_items(shape: tuple[int, ...], where: str) -> None:
    if len(shape) == 0:
        raise UserError(f"{where}: the array is a scalar (0-d); give an array of items (N×...)")
    if shape[0] == 0:
        raise UserError(f"{where}: the data is empty (0 items); give a file with at least one item")
    if 0 in shape:
        raise UserError(f"{where}: each item has shape {shape[1:]} with no elements")


def canonical_array(arr: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """Apply the layout and dtype rules above; return the array and its scale name."""
    _check_items(arr.shape, where)
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


def load_npz(path: Path, *, key: str | None, labels_key: str | None, limit: int | None) -> RawData:
    """Read array ``key`` (default ``x``, or the only one) and labels (default ``y``)."""
    npz = _np_load(path, ".npz")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array (an .npy file); rename it to .npy")
    with npz:
        keys = list(npz.files)
        if not keys:
            raise UserError(f"{path} holds no arrays; save the data with np.savez(path, x=...)")
        available = ", ".join(keys)
        if key is None:
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
        labels = None if labels_key is None else _npz_member(npz, labels_key, path)
    _check_items(arr.shape, f"{path}[{key}]")
    if labels is not None:
        labels = check_labels(labels, len(arr), f"{path}[{labels_key}]")[:limit]
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


class Items(ABC):
    """A file's items in canonical layout, unscaled, read by rows: ``read(lo, hi)`` and
    ``take(idx)`` return only the rows asked for, so a caller bounds its memory by what it asks
    (``data.chunked``); the loaders below read all rows at once through the same calls."""

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


class ArrayItems(Items):
    """Rows of an array (an ``.npy`` memory map, a cached named source): each read converts only
    its rows to the canonical layout and dtype (``canonical_array``; an integer array's range is
    checked on the rows read)."""

    def __init__(
        self, values: np.ndarray, scale: str | None, labels: np.ndarray | None, where: str
    ) -> None:
        _check_items(values.shape, where)
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
    _check_items(arr.shape, str(path))
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
        _check_items(shape, str(path))
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


class ImageItems(Items):
    """Image files (of a folder or a zip), decoded when their rows are read; the first image
    (decoded on opening) fixes the size and mode every other must have."""

    def __init__(
        self,
        files: list[tuple[str, Callable[[], IO[bytes]]]],
        labels: np.ndarray | None,
        where: str,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.files, self.labels, self.where, self._close = files, labels, where, close
        self.n, self.scale = len(files), "uint8"
        try:
            self.shape = _decode_images(files[:1], where).shape[1:]
        except UserError:
            close()
            raise

    def take(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        chosen = [self.files[int(i)] for i in idx]
        return _decode_images(chosen, self.where, (self.files[0][0], self.shape))

    def read(self, lo: int, hi: int) -> np.ndarray:
        return _decode_images(self.files[lo:hi], self.where, (self.files[0][0], self.shape))

    def close(self) -> None:
        self._close()


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    """Opens ``path`` for reading bytes when called."""
    return lambda: path.open("rb")


def _zip_opener(zf: zipfile.ZipFile, name: str) -> Callable[[], IO[bytes]]:
    """Opens the member ``name`` of ``zf`` when called."""
    return lambda: zf.open(name)


def open_image_folder(path: Path, *, limit: int | None) -> ImageItems:
    """The first ``limit`` images below ``path`` (see the module docstring for labels)."""
    files = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise UserError(f"{path}: the folder holds no PNG/JPEG images")
    if (path / _LABELS_FILE).is_file():
        labels = _labels_from_json((path / _LABELS_FILE).read_bytes(), files, str(path))
    elif all("/" in f for f in files):
        classes = sorted({f.split("/", 1)[0] for f in files})
        ids = {c: i for i, c in enumerate(classes)}
        labels = np.array([ids[f.split("/", 1)[0]] for f in files], dtype=np.int64)
    else:
        labels = None
    files = files[:limit]
    openers = [(f, _opener(path / f)) for f in files]
    return ImageItems(openers, None if labels is None else labels[:limit], str(path))


def load_image_folder(path: Path, *, limit: int | None) -> RawData:
    """Decode the first ``limit`` images below ``path`` (see the module docstring for labels)."""
    return open_image_folder(path, limit=limit).raw()


def open_edm_zip(path: Path, *, limit: int | None) -> ImageItems:
    """The first ``limit`` images of an EDM-style zip (labels from its dataset.json); the zip
    stays open while the items are referenced."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a readable zip file ({exc})") from None
    names = zf.namelist()
    files = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        zf.close()
        raise UserError(f"{path}: the zip holds no PNG/JPEG images")
    labels = None
    if _LABELS_FILE in names:
        try:
            labels = _labels_from_json(_zip_read(zf, _LABELS_FILE, path), files, str(path))
        except UserError:
            zf.close()
            raise
    files = files[:limit]
    openers = [(f, _zip_opener(zf, f)) for f in files]
    return ImageItems(openers, None if labels is None else labels[:limit], str(path), zf.close)


def load_edm_zip(path: Path, *, limit: int | None) -> RawData:
    """Decode the first ``limit`` images of an EDM-style zip; labels from its dataset.json."""
    items = open_edm_zip(path, limit=limit)
    try:
        return items.raw()
    finally:
        items.close()


def _zip_read(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:
        raise UserError(f"{path}: cannot read {name} ({exc}); the zip is corrupt") from None


def _labels_from_json(text: bytes, files: list[str], where: str) -> np.ndarray | None:
    """EDM's ``{"labels": [[filename, label], ...]}`` (or null) matched to ``files``."""
    try:
        entries = json.loads(text)["labels"]
        table = None if entries is None else {str(name): label for name, label in entries}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise UserError(
            f'{where}: {_LABELS_FILE} is not {{"labels": [[filename, label], ...]}} or null'
        ) from None
    if table is None:
        return None
    missing = [f for f in files if f not in table]
    if missing:
        raise UserError(f"{where}: {_LABELS_FILE} has no label for {missing[0]}")
    labels = [table[f] for f in files]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels):
        raise UserError(f"{where}: {_LABELS_FILE} labels must be integers >= 0")
    return np.array(labels, dtype=np.int64)


def _image_array(image: Image.Image) -> np.ndarray:
    """C×H×W uint8: 1 channel for grayscale, 3 for colour (alpha dropped)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise UserError(f"{image.mode} images (16-bit or float) are not supported; save 8-bit")
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))[None]
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]} {'gray' if shape[0] == 1 else 'RGB'}"


def _decode_images(
    items: list[tuple[str, Callable[[], IO[bytes]]]],
    where: str,
    like: tuple[str, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """Stack decoded images into N×C×H×W uint8; all must share one size and channel count (that
    of ``like``, (name, C×H×W) of a first image, where given)."""
    from PIL import Image

    out = np.empty((len(items), *like[1]), dtype=np.uint8) if like is not None else None
    first = "" if like is None else like[0]
    for i, (name, open_file) in enumerate(items):
        try:
            with open_file() as f, Image.open(f) as image:
                arr = _image_array(image)
        except UserError as exc:
            raise UserError(f"{where}: {name}: {exc}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UserError(f"{where}: cannot read image {name} ({exc})") from None
        if out is None:
            out, first = np.empty((len(items), *arr.shape), dtype=np.uint8), name
        elif arr.shape[1:] == out.shape[2:] and arr.shape[0] != out.shape[1]:
            mode = {1: "gray (1 channel)", 3: "RGB (3 channels)"}
            raise UserError(
                f"{where}: images differ in channels: {first} is {mode[out.shape[1]]} but "
                f"{name} is {mode[arr.shape[0]]}; convert them to one mode"
            )
        elif arr.shape != out.shape[1:]:
            raise UserError(
                f"{where}: images differ in size: {first} is {_describe(out.shape[1:])} "
                f"but {name} is {_describe(arr.shape)}; convert them to one size and mode"
            )
        out[i] = arr
    assert out is not None
    return out
