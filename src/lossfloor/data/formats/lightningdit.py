"""LightningDiT's latent folders (``extract_features.py``): safetensors shards, each with
``latents`` (one sampled VA-VAE latent per image, N×C×h×w), ``latents_flip`` (the latent of the
mirrored image) and ``labels``, and ``latents_stats.pt`` ({"mean", "std"}: 1×C×1×1 per-channel
statistics).

LightningDiT trains on one of the two latents of an image, each with probability ½, in the
units (latent − mean)/std·multiplier (``datasets/img_latent_dataset.py``, ``latent_norm: true``,
``latent_multiplier: 1.0`` in its configs): the data are the 2N latents, points (a sampled latent
is a point, not a Gaussian item), read here in the shards' sorted order with every flip after
every latent, as ``--xflip`` orders copies. ``encoder``: ``lightningdit`` (the default) those
units, computed as LightningDiT computes them; ``raw`` as stored; or a ``LatentTransform``
(``--latent-scale``/``--latent-bias``, per channel, on the raw latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lossfloor.data.formats.items import RawData, check_labels
from lossfloor.data.formats.latents import latent_transform
from lossfloor.errors import UserError

SHARD_SUFFIX = ".safetensors"
STATS_FILE = "latents_stats.pt"
KEYS = ("latents", "latents_flip", "labels")


def is_latent_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of LightningDiT latent shards (it holds *.safetensors)."""
    return path.is_dir() and any(path.glob(f"*{SHARD_SUFFIX}"))


def load_lightningdit(
    path: Path,
    *,
    limit: int | None,
    encoder: str | None = None,
    latent_scale: Sequence[float] | None = None,
    latent_bias: Sequence[float] | None = None,
) -> RawData:
    """The first ``limit`` images' latents then their flips' (2·limit points, float32, in the
    units ``encoder`` or ``latent_scale``/``latent_bias`` name; module docstring), with labels
    for both."""
    latents, flips, labels = _read_shards(path, limit)
    if encoder in (None, "lightningdit") and latent_scale is None and latent_bias is None:
        mean, std = _stats(path, latents.shape[1])
        both = np.concatenate([latents, flips])
        values = (both - mean) / std  # LightningDiT's own arithmetic, float32
    else:
        if encoder == "lightningdit":
            raise UserError(
                f"{path}: --encoder lightningdit uses {STATS_FILE}; give it or "
                "--latent-scale/--latent-bias, not both"
            )
        transform = latent_transform(encoder, latent_scale, latent_bias)
        both = np.concatenate([latents, flips])
        values = both if transform is None else transform.points(both, str(path))
    return RawData(values.astype(np.float32, copy=False), np.concatenate([labels, labels]), "float")


def _read_shards(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latents, flips, labels) of the first ``limit`` images over the sorted shards."""
    from safetensors import SafetensorError, safe_open

    parts: dict[str, list[np.ndarray]] = {key: [] for key in KEYS}
    left = limit
    for shard in sorted(path.glob(f"*{SHARD_SUFFIX}")):
        if left is not None and left <= 0:
            break
        try:
            with safe_open(str(shard), framework="pt") as f:
                missing = [key for key in KEYS if key not in f.keys()]  # noqa: SIM118
                if missing:
                    raise UserError(
                        f"{shard}: no tensor {missing[0]!r}; a LightningDiT shard holds "
                        f"{', '.join(KEYS)}"
                    )
                arrays = {key: _numpy(f.get_slice(key)[:left]) for key in KEYS}
        except (SafetensorError, OSError, TypeError) as exc:
            raise UserError(f"{shard} is not a readable safetensors file ({exc})") from None
        _check_shard(shard, arrays, parts)
        for key in KEYS:
            parts[key].append(arrays[key])
        left = None if left is None else left - len(arrays["labels"])
    latents, flips = (np.concatenate(parts[k]).astype(np.float32) for k in KEYS[:2])
    return latents, flips, check_labels(np.concatenate(parts["labels"]), len(latents), str(path))


def _numpy(t: object) -> np.ndarray:
    """A shard's tensor as numpy (bfloat16 and float16 latents as float32)."""
    import torch

    assert isinstance(t, torch.Tensor)
    return (t.float() if t.is_floating_point() else t).numpy()


def _check_shard(shard: Path, arrays: dict[str, np.ndarray], before: dict) -> None:
    """One line where a shard's latents are not N×C×h×w floats, its flips or labels do not
    match them, or its latents' shape differs from the shards' before it."""
    lat, flip, lab = (arrays[k] for k in KEYS)
    if lat.ndim != 4 or lat.dtype.kind != "f":
        raise UserError(f"{shard}: latents are {lat.dtype} of shape {lat.shape}; expected N×C×h×w")
    if flip.shape != lat.shape or lab.shape != (len(lat),):
        raise UserError(
            f"{shard}: latents {lat.shape}, latents_flip {flip.shape} and labels {lab.shape} "
            "do not match"
        )
    if before["latents"] and before["latents"][0].shape[1:] != lat.shape[1:]:
        raise UserError(
            f"{shard}: latents of shape {lat.shape[1:]}, but earlier shards' are "
            f"{before['latents'][0].shape[1:]}"
        )


def _stats(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """LightningDiT's per-channel mean and std (1×C×1×1, float32) from ``latents_stats.pt``."""
    import torch

    file = path / STATS_FILE
    if not file.is_file():
        raise UserError(
            f"{path}: no {STATS_FILE} (LightningDiT's latent statistics); give --encoder raw, "
            "or --latent-scale/--latent-bias for the units"
        )
    try:
        stats = torch.load(file, map_location="cpu", weights_only=True)
        mean, std = (stats[k].float().numpy().reshape(1, -1, 1, 1) for k in ("mean", "std"))
    except Exception as exc:  # noqa: BLE001 (any unreadable file: one line)
        raise UserError(f"{file}: not LightningDiT's statistics {{mean, std}} ({exc})") from None
    if mean.shape[1] != channels or std.shape[1] != channels or not np.all(std > 0):
        raise UserError(
            f"{file}: mean {mean.shape} and std {std.shape} must be positive per-channel "
            f"statistics of the latents' {channels} channels"
        )
    return mean, std
