"""Latents back to images through a VAE: a model trained on VAE latents in final units
(x = raw·scale + bias per channel, ``data.formats.latents.LatentTransform``, recorded with the
run's data) draws latents; raw = (x − bias)/scale maps them back to the VAE's units, and a
diffusers ``AutoencoderKL`` (saved with ``save_pretrained``) decodes them into images in
[−1, 1] (clipped), the units of pixel data. A sample file of latents says so in its ``meta``
(``latent``), so that what measures images refuses it undecoded.
The VAE folder is read by ``data.encode.load_vae``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossfloor.data.formats.latents import LatentTransform
from lossfloor.errors import UserError

Tensor = torch.Tensor


def to_raw(x: Tensor, transform: LatentTransform | None) -> Tensor:
    """raw = (x − bias)/scale per channel of N×C×H×W latents (no transform: x as it is), the
    inverse of ``LatentTransform.apply``'s mean·scale + bias; float32."""
    if transform is None:
        return x.float()
    channels = x.shape[1]
    for name, v in (("scale", transform.scale), ("bias", transform.bias)):
        if len(v) not in (1, channels):
            raise UserError(
                f"the latents have {channels} channels but their recorded latent {name} has "
                f"{len(v)} values"
            )
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = torch.from_numpy(transform.scale).reshape(shape).to(x.device)
    bias = torch.from_numpy(transform.bias).reshape(shape).to(x.device)
    return (x.float() - bias) / scale


@torch.no_grad()
def decode(
    vae: Any,
    x: Tensor,
    transform: LatentTransform | None,
    batch: int = 64,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Images in [−1, 1] (clipped; CPU float32) of latents ``x`` in final units:
    vae.decode((x − bias)/scale), ``batch`` latents at a time on ``device``."""
    check_fits(vae, tuple(x.shape[1:]))
    out = []
    with torch.no_grad():  # the same kernels whether or not the VAE's weights require grad
        for i in range(0, len(x), batch):
            raw = to_raw(x[i : i + batch].to(device), transform)
            out.append(vae.decode(raw).sample.float().cpu())
    return torch.cat(out).clamp_(-1, 1)


def check_fits(vae: Any, shape: tuple[int, ...]) -> None:
    """UserError (one line) unless latents of ``shape`` (C×h×w) have the VAE's channels."""
    expected = vae.config.latent_channels
    if len(shape) != 3 or shape[0] != expected:
        raise UserError(
            f"--vae: the samples are {'×'.join(map(str, shape))} but the VAE decodes "
            f"{expected}-channel latents {expected}×h×w"
        )


def transform_of(data: dict[str, Any] | None) -> LatentTransform | None:
    """The latent transform a run's (or a sample file's) data record holds (None: none
    recorded, the latents are the VAE's own units)."""
    record = (data or {}).get("latent_transform")
    return None if record is None else LatentTransform.from_json(record)


def is_latent_data(data: dict[str, Any] | None) -> bool:
    """Whether a data record (``Dataset.describe``) is of VAE latents."""
    return data is not None and ("gaussian_items" in data or "latent_transform" in data)


def sample_meta(path: str | Path) -> dict[str, Any] | None:
    """The JSON ``meta`` of a sample .npz (``lossfloor sample --out-npz``); None for another
    file or one without it."""
    p = Path(path).expanduser()
    if p.suffix.lower() != ".npz" or not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            if "meta" not in z.files:
                return None
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return meta if isinstance(meta, dict) else None
