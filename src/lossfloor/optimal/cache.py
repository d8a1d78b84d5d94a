"""On-disk cache of the optimal denoiser's per-sample values, so that diagnosing many
checkpoints of one run, or many runs, on the same draws computes J* once.

One file per (data fingerprint, outer draws: M, seed, conditional; σ; dtype; estimator; device
type and tile size, which can change the last bits) under ``$LOSSFLOOR_CACHE/optimal``
(default ``~/.cache/lossfloor/optimal``): an .npz holding both forms (float64, in the order of
the draws) and the key it was computed for. A file that cannot be read, or whose key or shapes
do not match, is recomputed and overwritten, never trusted. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossfloor.data import cache_dir
from lossfloor.errors import UserError
from lossfloor.io import save_with
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.estimators import Estimator, PerSample

#: Part of every key: bumped when the per-sample values of the same key would change.
CACHE_FORMAT = "lossfloor-per-sample/1"


def per_sample_key(
    plan: OuterPlan,
    estimator: Estimator,
    sigma: float,
    dtype: torch.dtype,
    device: torch.device,
    tile_bytes: int,
) -> dict[str, Any]:
    """Everything the per-sample values of ``per_sample_values(plan, estimator, σ, dtype, …)``
    depend on, as JSON."""
    return {
        "format": CACHE_FORMAT,
        "data": plan.fingerprint,
        "outer": plan.outer,
        "seed": plan.seed,
        "conditional": plan.conditional,
        "sigma": float(sigma),
        "dtype": str(dtype).removeprefix("torch."),
        "estimator": estimator.to_config(),
        "device": torch.device(device).type,
        "tile_bytes": int(tile_bytes),
    }


def cache_path(key: dict[str, Any], folder: str = "optimal") -> Path:
    """The file of ``key``: ``$LOSSFLOOR_CACHE/<folder>/<sha256 of the key>.npz``."""
    digest = hashlib.sha256(canonical(key).encode()).hexdigest()
    return cache_dir() / folder / f"{digest[:32]}.npz"


def cached_per_sample(key: dict[str, Any], m: int, compute: Callable[[], PerSample]) -> PerSample:
    """The M per-sample values of ``key`` from the cache, or ``compute()``d and stored."""
    path = cache_path(key)
    hit = _read(path, key, m)
    if hit is not None:
        return hit
    values = compute()
    write_arrays(path, key, {"closed": values.closed.numpy(), "direct": values.direct.numpy()})
    return values


def canonical(key: dict[str, Any]) -> str:
    """The key as the text stored beside the arrays and hashed into the file name."""
    return json.dumps(key, sort_keys=True)


def read_arrays(path: Path, key: dict[str, Any], names: list[str]) -> list[np.ndarray] | None:
    """The arrays ``names`` of a ``write_arrays`` file if it holds exactly ``key``; None when it
    is missing, unreadable, truncated, of another key or lacks one of them."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != canonical(key):
                return None
            return [f[name] for name in names]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _read(path: Path, key: dict[str, Any], m: int) -> PerSample | None:
    """The stored values if ``path`` holds exactly ``key`` with M finite float64 values per
    form; None otherwise (missing, truncated, foreign or mismatching)."""
    arrays = read_arrays(path, key, ["closed", "direct"])
    if arrays is None:
        return None
    closed, direct = arrays
    for arr in (closed, direct):
        if arr.dtype != np.float64 or arr.shape != (m,) or not np.isfinite(arr).all():
            return None
    return PerSample(closed=torch.from_numpy(closed), direct=torch.from_numpy(direct))


def write_arrays(path: Path, key: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Store ``arrays`` and the key atomically in one .npz; a cache that cannot be written only
    costs a recomputation later (a warning)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            # allow_pickle: numpy's default, named so that **arrays cannot be taken for it
            np.savez(f, key=np.array(canonical(key)), allow_pickle=True, **arrays)

    try:
        save_with(path, save)
    except (OSError, UserError) as exc:
        warnings.warn(f"could not write the cache file {path}: {exc}", stacklevel=3)
