"""Gaussian items: per item the mean and the per-element std of a VAE posterior N(m_i, s_i²), so
the data is the mixture (1/N) Σ_i N(m_i, diag s_i²).

Read from an ``.npz`` with arrays ``mean`` and ``std`` of one shape (``arrays.load_npz``, final
units unless a transform is given) or from an EDM2 latent zip (as EDM2's ``dataset_tool.py
encode`` writes it): members ``NNNNN/img-mean-std-NNNNNNNN.npy``, each one item's mean and std
concatenated on channels (2C×H×W), and ``dataset.json`` (labels or null). Those are raw VAE
latents: the final units x0 = (m + s·z)·scale + bias take a ``LatentTransform`` per channel,
i.e. mean·scale + bias and std·|scale| (float32, each operation rounded once).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lossfloor.data.formats.images import LABELS_FILE, _labels_from_json, _zip_read
from lossfloor.data.formats.items import RawData, canonical_array
from lossfloor.errors import ParameterError, UserError

#: EDM2's StabilityVAEEncoder (training/encoders.py): the assumed mean and std of the raw
#: latents of stabilityai/sd-vae-ft-mse per channel, mapped to mean 0 and std 0.5.
SD_VAE_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
SD_VAE_RAW_STD = (4.17, 4.62, 3.71, 3.28)
SD_VAE_FINAL_STD = 0.5
ENCODERS = ("sd-vae", "raw", "lightningdit")  # lightningdit: formats.lightningdit only
LATENT_SUFFIX = ".npy"


@dataclass(frozen=True)
class LatentTransform:
    """Per channel (or one value for all): final = raw·scale + bias (float32)."""

    scale: np.ndarray  # float32, length 1 or C
    bias: np.ndarray  # float32, length 1 or C

    def apply(self, mean: np.ndarray, std: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean·scale + bias, std·|scale|) of N×C×… float32 arrays, per channel."""
        scale, bias = self._per_channel(mean, where)
        return mean * scale + bias, std * np.abs(scale)

    def points(self, values: np.ndarray, where: str) -> np.ndarray:
        """values·scale + bias of N×C×… float32 points (sampled latents), per channel."""
        scale, bias = self._per_channel(values, where)
        return values * scale + bias

    def _per_channel(self, values: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """scale and bias shaped to broadcast over N×C×… ``values`` (one value or C each)."""
        channels = values.shape[1]
        for name, v in (("latent_scale", self.scale), ("latent_bias", self.bias)):
            if len(v) not in (1, channels):
                raise ParameterError(
                    name, ",".join(f"{x:g}" for x in v), f"{where} has {channels} channels; "
                    f"give one value or {channels}",
                )  # fmt: skip
        shape = (1, -1) + (1,) * (values.ndim - 2)
        return self.scale.reshape(shape), self.bias.reshape(shape)

    def to_json(self) -> dict[str, list[float]]:
        """{"scale": [...], "bias": [...]}: the record a run or a sample file keeps."""
        return {"scale": self.scale.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_json(cls, record: dict[str, list[float]]) -> LatentTransform:
        """The transform ``to_json`` recorded (float32 values round-trip exactly)."""
        return cls(np.array(record["scale"], np.float32), np.array(record["bias"], np.float32))


def latent_transform(
    encoder: str | None,
    scale: Sequence[float] | None = None,
    bias: Sequence[float] | None = None,
) -> LatentTransform | None:
    """The transform ``encoder`` (``sd-vae``: EDM2's constants, scale = 0.5/raw_std and
    bias = −raw_mean·scale in float32; ``raw``: scale 1, bias 0) or ``scale``/``bias`` name
    (one left out: 1 or 0); None when none is given."""
    if encoder is not None and (scale is not None or bias is not None):
        raise ParameterError(
            "encoder", encoder, "give either {option} or latent_scale/latent_bias, not both"
        )
    if encoder == "sd-vae":
        s = np.float32(SD_VAE_FINAL_STD) / np.array(SD_VAE_RAW_STD, dtype=np.float32)
        return LatentTransform(s, np.float32(0) - np.array(SD_VAE_RAW_MEAN, dtype=np.float32) * s)
    if encoder == "raw":
        return LatentTransform(np.ones(1, np.float32), np.zeros(1, np.float32))
    if encoder == "lightningdit":
        raise ParameterError("encoder", encoder, "applies only to LightningDiT latent folders")
    if encoder is not None:
        raise ParameterError(
            "encoder", encoder, f"unknown encoder; use one of {', '.join(ENCODERS)}"
        )
    if scale is None and bias is None:
        return None
    values = []
    for name, given, default in (("latent_scale", scale, 1.0), ("latent_bias", bias, 0.0)):
        v = np.array([default] if given is None else list(given), dtype=np.float64)
        shown = ",".join(f"{x:g}" for x in v)
        if v.ndim != 1 or len(v) == 0:
            raise ParameterError(name, shown, "give one value or one per channel")
        if not np.all(np.isfinite(v)) or (name == "latent_scale" and np.any(v == 0)):
            raise ParameterError(name, shown, "must be finite" + (" and non-zero" * (default == 1)))
        values.append(v.astype(np.float32))
    return LatentTransform(values[0], values[1])


def gaussian_items(
    mean: np.ndarray, std: np.ndarray, where: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 mean and std of the first ``limit`` items in canonical layout
    (``canonical_array``): both float, of one shape, finite, std ≥ 0."""
    if mean.shape != std.shape:
        raise UserError(f"{where}: std has shape {std.shape} but mean has {mean.shape}")
    out = []
    for name, arr in (("mean", mean[:limit]), ("std", std[:limit])):
        if arr.dtype.kind != "f":
            raise UserError(f"{where}: {name} must be a float array, got dtype {arr.dtype}")
        values, _ = canonical_array(arr, f"{where}[{name}]")
        with np.errstate(over="ignore"):
            values = values.astype(np.float32)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise UserError(f"{where}: {name} holds {bad} NaN or infinite values (in float32)")
        out.append(values)
    negative = int(np.count_nonzero(out[1] < 0))
    if negative:
        raise UserError(f"{where}: std holds {negative} negative values; a std is ≥ 0")
    return out[0], out[1]


def is_latent_zip(names: Sequence[str]) -> bool:
    """Whether a zip's member ``names`` are an EDM2 latent zip (.npy members, no images)."""
    return any(n.endswith(LATENT_SUFFIX) for n in names)


def load_edm_latents(path: Path, *, limit: int | None) -> RawData:
    """The first ``limit`` items of an EDM2 latent zip, raw units: RawData with ``values`` the
    means and ``std`` the stds (each member's channels split in half), labels from dataset.json."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a readable zip file ({exc})") from None
    with zf:
        names = zf.namelist()
        files = sorted(n for n in names if n.endswith(LATENT_SUFFIX))
        labels = None
        if LABELS_FILE in names:
            labels = _labels_from_json(_zip_read(zf, LABELS_FILE, path), files, str(path))
        files = files[:limit]
        items = [_latent_member(zf, name, path) for name in files]
    first = items[0]
    for name, item in zip(files, items, strict=True):
        if item.shape != first.shape:
            raise UserError(
                f"{path}: latents differ in shape: {files[0]} is {first.shape} but {name} is "
                f"{item.shape}"
            )
    stacked = np.stack(items)
    c = stacked.shape[1] // 2
    mean, std = gaussian_items(stacked[:, :c], stacked[:, c:], str(path))
    return RawData(mean, None if labels is None else labels[:limit], "float", std)


def _latent_member(zf: zipfile.ZipFile, name: str, path: Path) -> np.ndarray:
    """One member: a float 2C×H×W array (mean and std on channels)."""
    try:
        arr = np.load(io.BytesIO(_zip_read(zf, name, path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path}: {name} is not a readable .npy array ({exc})") from None
    if arr.ndim != 3 or arr.dtype.kind != "f" or math.prod(arr.shape) == 0:
        raise UserError(
            f"{path}: {name} is {arr.dtype} of shape {arr.shape}; an EDM2 latent is a float "
            "2C×H×W array (mean and std on channels)"
        )
    if arr.shape[0] % 2:
        raise UserError(
            f"{path}: {name} has {arr.shape[0]} channels, an odd count; an EDM2 latent holds "
            "the mean and the std on channels (2C)"
        )
    return arr
