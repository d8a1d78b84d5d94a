"""The cache of decoded named datasets: raw ``.npy`` arrays, memory-mapped, keyed by the sha256
of the source files they were decoded from.

In ``cache_dir()/datasets``, ``<name>.json`` records the format, the sha256 of every source file
and, per array, its dtype, shape and sha256; the arrays are ``<name>-<key>.<array>.npy`` (key:
16 hex digits of a digest of the sources). A load hashes the sources and the arrays again: a
cache that does not match (the source changed, an array was truncated or altered, the header is
malformed) is decoded again and rewritten, never used. Every file is written atomically, the
header last.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lossfloor.errors import UserError
from lossfloor.io import atomic_path, write_json

FORMAT = "lossfloor-dataset-cache/1"


def cache_dir() -> Path:
    """Where converted datasets live: ``$LOSSFLOOR_CACHE`` or ``~/.cache/lossfloor``."""
    return Path(os.environ.get("LOSSFLOOR_CACHE") or Path.home() / ".cache" / "lossfloor")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def array_sha256(arr: np.ndarray) -> str:
    """sha256 of a C-contiguous array's bytes."""
    return hashlib.sha256(arr.data.cast("B")).hexdigest()


def _array_path(folder: Path, name: str, sources: dict[str, str], array: str) -> Path:
    key = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{name}-{key}.{array}.npy"


def _load(folder: Path, name: str, sources: dict[str, str]) -> dict[str, np.ndarray] | None:
    """The cached arrays of ``name`` if its header names exactly these sources and every array
    matches its recorded dtype, shape and sha256; else None."""
    try:
        header = json.loads((folder / f"{name}.json").read_text())
        if header["format"] != FORMAT or header["sources"] != sources:
            return None
        arrays = {}
        for array, meta in header["arrays"].items():
            path = _array_path(folder, name, sources, array)
            arr = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
            if (
                arr.dtype.str != meta["dtype"]
                or list(arr.shape) != meta["shape"]
                or array_sha256(arr) != meta["sha256"]
            ):
                return None
            arrays[array] = arr
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, truncated or malformed: rebuilt by the caller
    return arrays


def _store(folder: Path, name: str, sources: dict[str, str], arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays, then the header; remove the arrays of earlier sources."""
    meta = {}
    for array, values in arrays.items():
        values = np.ascontiguousarray(values)
        with atomic_path(_array_path(folder, name, sources, array)) as tmp, tmp.open("wb") as f:
            np.save(f, values, allow_pickle=False)
        meta[array] = {
            "dtype": values.dtype.str,
            "shape": list(values.shape),
            "sha256": array_sha256(values),
        }
    write_json(folder / f"{name}.json", {"format": FORMAT, "sources": sources, "arrays": meta})
    current = {_array_path(folder, name, sources, array) for array in arrays}
    for path in folder.glob(f"{name}-{'?' * 16}.*.npy"):
        if path not in current:
            path.unlink(missing_ok=True)


def cached_arrays(
    name: str, sources: Sequence[Path], decode: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays ``decode()`` makes of the files ``sources``: memory-mapped (read-only) from the
    cache when it holds them for these exact source bytes, else decoded now and cached (with a
    warning, and uncached, when the cache folder is not writable)."""
    digests = {p.name: file_sha256(p) for p in sources}
    folder = cache_dir() / "datasets"
    cached = _load(folder, name, digests)
    if cached is not None:
        return cached
    arrays = decode()
    try:
        _store(folder, name, digests, arrays)
    except (OSError, UserError) as exc:
        warnings.warn(
            f"cannot cache {name} in {folder} ({exc}); it is decoded at every load "
            "(set LOSSFLOOR_CACHE to a writable folder)",
            stacklevel=2,
        )
    return arrays
