"""``Denoiser``: any backbone, process and target as an EDM-style D(x, σ, labels) → x̂0.

x = x0 + σ̃·ε is in VE coordinates. With t = t(σ̃) and α = α(t), the process point is x_t = α·x;
the backbone sees x_in = c_in·x_t, c_in = 1/√(α²σ_d² + σ_t²) (= EDM's 1/√(σ̃² + σ_d²) applied to
x, so Var(x_in) = 1 when Var(x0) = σ_d²), and the target's c_noise, and its output is turned
into x̂0 by the target. Coefficients are computed in float64, then cast to x's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lossfloor.diffusion.processes import Process, TensorLike, as_sigma, get_process
from lossfloor.diffusion.targets import EDMF, Target, edm_c_in, get_target
from lossfloor.errors import UserError

__all__ = ["Denoiser", "as_sigma"]

Backbone = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class Denoiser(torch.nn.Module):
    """D(x, σ, labels) = target.to_x0(net(c_in·x_t, c_noise, labels), x_t, t), x_t = α(t(σ))·x.

    ``net(x_in, c_noise, labels)`` returns a prediction in the target's units; ``process`` and
    ``target`` are objects or names. ``scale_input=False`` feeds x_t unscaled. For target F,
    ``sigma_data`` must equal the target's.
    """

    def __init__(
        self,
        net: Backbone,
        process: Process | str,
        target: Target | str,
        sigma_data: float = 0.5,
        scale_input: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < sigma_data < math.inf:
            raise UserError(f"sigma_data must be a positive number, got {sigma_data}")
        self.net = net
        self.process = get_process(process)
        self.target = get_target(target, sigma_data)
        if isinstance(self.target, EDMF) and self.target.sigma_data != sigma_data:
            raise UserError(
                f"target F has sigma_data={self.target.sigma_data} but the Denoiser got "
                f"sigma_data={sigma_data}; pass the same value to both"
            )
        self.sigma_data = float(sigma_data)
        self.scale_input = bool(scale_input)

    def _point(self, x: Tensor, sigma: TensorLike) -> tuple[Tensor, Tensor, Tensor]:
        """(σ̃, t, α) in float64, each shaped [N, 1, …, 1]."""
        sigma_ve = as_sigma(sigma, x, torch.float64)
        t = self.process.t_of_sigma_ve(sigma_ve)
        return sigma_ve, t, self.process.alpha(t)

    def forward(self, x: Tensor, sigma: TensorLike, labels: Tensor | None = None) -> Tensor:
        """x̂0 for x = x0 + σ̃·ε; σ̃ a float, [N] or [N, 1, …, 1]. Output has x's dtype.

        c_noise is passed flat ([N]) in float32 (float64 when x is float64).
        """
        sigma_ve, t, alpha = self._point(x, sigma)
        x_t = alpha.to(x.dtype) * x
        x_in = edm_c_in(sigma_ve, self.sigma_data).to(x.dtype) * x if self.scale_input else x_t
        c_noise = self.target.c_noise(t, self.process).reshape(-1)
        pred = self.net(x_in, c_noise.to(torch.promote_types(x.dtype, torch.float32)), labels)
        return self.target.to_x0(pred, x_t, t, self.process).to(x.dtype)

    def target_of(self, x: Tensor, sigma: TensorLike, x0_hat: Tensor) -> Tensor:
        """The target (in its units) that the x0 estimate x0_hat implies at the VE point (x, σ̃)."""
        _, t, alpha = self._point(x, sigma)
        return self.target.from_x0(x0_hat, alpha.to(x.dtype) * x, t, self.process)

    def loss_factor(self, sigma: TensorLike) -> Tensor:
        """Target loss / x0 loss at VE level σ̃ (float64, shaped like sigma)."""
        return self.target.loss_factor(self.process.t_of_sigma_ve(sigma), self.process)

    def to_config(self) -> dict[str, Any]:
        """Process, target, sigma_data and scale_input, JSON-serialisable."""
        return {
            "process": self.process.to_config(),
            "target": self.target.to_config(),
            "sigma_data": self.sigma_data,
            "scale_input": self.scale_input,
        }
