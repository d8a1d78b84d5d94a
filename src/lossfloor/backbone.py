"""The network F_θ(x_in, c_noise, labels): a diffusers ``UNet2DModel`` built from a config (no hub).

Sizing rule for any H×W: a preset names up to ``len(channels)`` resolution levels; the UNet uses
L = min(preset levels, 1 + ⌊log2(min(H, W)/4)⌋) levels (at least 1), so the lowest level is never
smaller than 4×4 (8×8 digits: 2 levels; 28×28 and 32×32: 3). Each level halves the size, so
the input is zero-padded (evenly on both sides) to multiples of 2^(L−1) and the output is
cropped back: every H×W works. The parameter count therefore depends on the image size only
through L (and the number of channels C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lossfloor.errors import UserError

Tensor = torch.Tensor

# channels per level, ResNet blocks per level, levels with self-attention (the mid block at the
# lowest level always has one), GroupNorm groups, attention head width.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"channels": (16, 32, 32), "layers": 1, "attention": (), "groups": 8, "head": 8},
    "small": {"channels": (32, 64, 64), "layers": 1, "attention": (2,), "groups": 8, "head": 8},
    "medium": {
        "channels": (64, 128, 128, 128),
        "layers": 2,
        "attention": (2,),
        "groups": 16,
        "head": 32,
    },
}
MIN_LOWEST_SIDE = 4


def num_levels(height: int, width: int, max_levels: int) -> int:
    """L = min(max_levels, 1 + ⌊log2(min(H, W)/4)⌋), at least 1."""
    side = min(height, width)
    fit = 1 + math.floor(math.log2(side / MIN_LOWEST_SIDE)) if side >= MIN_LOWEST_SIDE else 1
    return max(1, min(max_levels, fit))


def _padding(size: int, multiple: int) -> tuple[int, int]:
    extra = (-size) % multiple
    return extra // 2, extra - extra // 2


def backbone_config(
    shape: Sequence[int], preset: str = "small", num_classes: int | None = None
) -> dict[str, Any]:
    """The JSON-able config of a preset UNet for C×H×W images (class-conditional if num_classes)."""
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"image shape must be C×H×W with positive sizes, got {tuple(shape)}")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"a class-conditional model needs at least one class, got {num_classes}")
    c, h, w = (int(s) for s in shape)
    p = PRESETS[preset]
    levels = num_levels(h, w, len(p["channels"]))
    channels = list(p["channels"][:levels])
    multiple = 2 ** (levels - 1)
    pad_h, pad_w = _padding(h, multiple), _padding(w, multiple)
    down = ["AttnDownBlock2D" if i in p["attention"] else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if i in p["attention"] else "UpBlock2D" for i in reversed(range(levels))]
    unet = {
        "sample_size": [h + sum(pad_h), w + sum(pad_w)],
        "in_channels": c,
        "out_channels": c,
        "block_out_channels": channels,
        "layers_per_block": p["layers"],
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": p["groups"],
        "attention_head_dim": p["head"],
        "time_embedding_type": "positional",
        "num_class_embeds": num_classes,
    }
    return {
        "preset": preset,
        "image_shape": [c, h, w],
        "num_classes": num_classes,
        "padding": [*pad_h, *pad_w],
        "unet": unet,
    }


class UNetBackbone(nn.Module):
    """net(x_in, c_noise, labels) = crop(UNet2DModel(pad(x_in), c_noise, labels))."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config
        unet = dict(config["unet"])
        for key in ("sample_size", "block_out_channels", "down_block_types", "up_block_types"):
            unet[key] = tuple(unet[key])
        # diffusers' __init__ shows a type checker its torch-less dummy UNet2DModel (not a
        # Module); the class imported at run time is the nn.Module
        self.unet: nn.Module = UNet2DModel(**unet)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int | None:
        return self.config["num_classes"]

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """F(x_in, c_noise) for a batch; c_noise is a scalar or one value per image.

        An unconditional net ignores ``labels``; a conditional one requires them.
        """
        c, h, w = self.config["image_shape"]
        if tuple(x_in.shape[1:]) != (c, h, w):
            raise UserError(
                f"the model expects {c}×{h}×{w} images, got {'×'.join(map(str, x_in.shape[1:]))}"
            )
        if self.num_classes is None:
            labels = None
        elif labels is None:
            raise UserError("this model is class-conditional: pass class labels")
        else:
            labels = labels.to(device=x_in.device, dtype=torch.long).reshape(-1)
        top, bottom, left, right = self.config["padding"]
        x = F.pad(x_in, (left, right, top, bottom))
        t = torch.as_tensor(c_noise, dtype=x_in.dtype, device=x_in.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x_in.shape[0])
        out = self.unet(x, t, class_labels=labels).sample
        return out[:, :, top : top + h, left : left + w]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
