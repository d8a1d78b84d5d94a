"""Exponential moving average of weights with EDM's half-life in images.

After a step of B images:  θ_ema ← β·θ_ema + (1−β)·θ,  β = 0.5^(B / h),  h = half-life in images.
With a ramp-up ratio r (EDM: 0.05), h = min(h, r·images_seen), so short runs are not dominated by
the initial weights. Buffers are copied, not averaged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lossfloor.errors import UserError


class EMA:
    """An averaged copy of ``model``; ``update`` after every optimiser step."""

    def __init__(
        self, model: nn.Module, halflife_images: float, rampup_ratio: float | None = 0.05
    ) -> None:
        if not halflife_images > 0:
            raise UserError(f"the EMA half-life must be > 0 images, got {halflife_images}")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise UserError(f"the EMA ramp-up ratio must be > 0 (or None), got {rampup_ratio}")
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = rampup_ratio
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, images_seen: int, batch_size: int) -> float:
        """β = 0.5^(B/h) with h = min(half-life, ramp-up·images seen)."""
        h = self.halflife_images
        if self.rampup_ratio is not None:
            h = min(h, self.rampup_ratio * images_seen)
        return 0.5 ** (batch_size / max(h, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_size: int) -> None:
        """θ_ema ← β·θ_ema + (1−β)·θ; ``images_seen`` counts this step's batch."""
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params: list[torch.Tensor] = list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: the model does not match the averaged copy")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.beta(images_seen, batch_size))
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
