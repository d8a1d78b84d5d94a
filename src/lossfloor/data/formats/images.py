"""Images: PNG/JPEG files of a folder or of an EDM-style zip, decoded when their rows are read.

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
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from lossfloor.data.formats.items import Items, RawData
from lossfloor.errors import UserError

if TYPE_CHECKING:  # PIL loads only when images are decoded
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS_FILE = "dataset.json"


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
    if (path / LABELS_FILE).is_file():
        labels = _labels_from_json((path / LABELS_FILE).read_bytes(), files, str(path))
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
        if any(n.endswith(".npy") for n in names):  # an EDM2 latent zip: latents.py
            raise UserError(
                f"{path}: an EDM2 latent zip (Gaussian items) is read whole, not by rows; leave "
                "out --stream (J* of it runs in memory, sharded over the processes of torchrun)"
            )
        raise UserError(f"{path}: the zip holds no PNG/JPEG images")
    labels = None
    if LABELS_FILE in names:
        try:
            labels = _labels_from_json(_zip_read(zf, LABELS_FILE, path), files, str(path))
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
            f'{where}: {LABELS_FILE} is not {{"labels": [[filename, label], ...]}} or null'
        ) from None
    if table is None:
        return None
    missing = [f for f in files if f not in table]
    if missing:
        raise UserError(f"{where}: {LABELS_FILE} has no label for {missing[0]}")
    labels = [table[f] for f in files]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels):
        raise UserError(f"{where}: {LABELS_FILE} labels must be integers >= 0")
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
