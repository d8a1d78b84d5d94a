"""Prediction targets: what a network outputs, as an affine function of its x0 estimate.

Every target is ``target = a(t)·x̂0 + b(t)·x_t`` at a process point x_t = α·x0 + σ·ε (process
coordinates), with ε̂ = (x_t − α·x̂0)/σ. Hence target error = a·(x0 error) and the loss factor
(target loss / x0 loss, per element) is exactly a².
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lossfloor.diffusion.processes import Process, TensorLike, as_sigma
from lossfloor.errors import ParameterError
from lossfloor.registry import Registry


def edm_c_skip(sigma: TensorLike, sigma_data: float = 0.5) -> Tensor:
    """EDM's skip scale c_skip = σ_d²/(σ² + σ_d²) (σ: VE noise level)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma_data**2 / (s**2 + sigma_data**2)


def edm_c_out(sigma: TensorLike, sigma_data: float = 0.5) -> Tensor:
    """EDM's output scale c_out = σ·σ_d/√(σ² + σ_d²)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return s * sigma_data / torch.sqrt(s**2 + sigma_data**2)


def edm_c_in(sigma: TensorLike, sigma_data: float = 0.5) -> Tensor:
    """EDM's input scale c_in = 1/√(σ² + σ_d²), so Var(c_in·(x0 + σε)) = 1 when Var(x0) = σ_d²."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / torch.sqrt(s**2 + sigma_data**2)


def edm_c_noise(sigma: TensorLike) -> Tensor:
    """EDM's noise conditioning c_noise = ¼·ln σ."""
    return 0.25 * torch.log(torch.as_tensor(sigma, dtype=torch.float64))


def edm_lambda(sigma: TensorLike, sigma_data: float = 0.5) -> Tensor:
    """EDM's loss weight λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out²."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


TARGETS: Registry[Target] = Registry("target")


class Target(ABC):
    """A prediction target: target = a·x̂0 + b·x_t; loss in target units = a²·(x0 loss)."""

    name: str

    @abstractmethod
    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        """(a(t), b(t)) in float64, shaped like t."""

    def to_config(self) -> dict[str, Any]:
        """The name (and parameters), JSON-serialisable."""
        return {"name": self.name}

    def from_x0(self, x0_hat: Tensor, x_t: Tensor, t: TensorLike, process: Process) -> Tensor:
        """The target implied by the x0 estimate at x_t: a·x̂0 + b·x_t (t per sample or scalar)."""
        dtype = torch.promote_types(x0_hat.dtype, x_t.dtype)
        a, b = (as_sigma(c, x_t, dtype) for c in self.coefficients(t, process))
        return a * x0_hat + b * x_t

    def to_x0(self, pred: Tensor, x_t: Tensor, t: TensorLike, process: Process) -> Tensor:
        """The x0 estimate implied by a target prediction: (pred − b·x_t)/a."""
        dtype = torch.promote_types(pred.dtype, x_t.dtype)
        a, b = (as_sigma(c, x_t, dtype) for c in self.coefficients(t, process))
        return (pred - b * x_t) / a

    def loss_factor(self, t: TensorLike, process: Process) -> Tensor:
        """a(t)²: ‖target_pred − target_true‖² = a²·‖x̂0 − x0‖², shaped like t (float64)."""
        return self.coefficients(t, process)[0] ** 2

    def c_noise(self, t: TensorLike, process: Process) -> Tensor:
        """The network's noise conditioning: the process's own unless the target fixes one."""
        return process.c_noise(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"


@TARGETS.register("x0")
class X0(Target):
    """x̂0 itself: a = 1, b = 0; factor 1."""

    name = "x0"

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        return one, torch.zeros_like(one)


@TARGETS.register("eps", "epsilon")
class Epsilon(Target):
    """ε̂ = (x_t − α·x̂0)/σ: a = −α/σ, b = 1/σ; factor α²/σ² = 1/σ̃²."""

    name = "eps"

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        alpha, sigma = process.alpha(t), process.sigma(t)
        return -alpha / sigma, 1 / sigma


@TARGETS.register("score")
class Score(Target):
    """Score −ε̂/σ = (α·x̂0 − x_t)/σ²: a = α/σ², b = −1/σ²; factor α²/σ⁴."""

    name = "score"

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        alpha, sigma = process.alpha(t), process.sigma(t)
        return alpha / sigma**2, -1 / sigma**2


@TARGETS.register("sigma-score", "ncsn")
class SigmaScore(Target):
    """σ·score = −ε̂ = (α·x̂0 − x_t)/σ: a = α/σ, b = −1/σ; factor α²/σ² = 1/σ̃².

    The raw output F of EDM's VEPrecond (D = x + σ·F) and of NCSN-style score networks.
    """

    name = "sigma-score"

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        alpha, sigma = process.alpha(t), process.sigma(t)
        return alpha / sigma, -1 / sigma


@TARGETS.register("velocity", "flow")
class Velocity(Target):
    """Flow velocity v = α̇·x̂0 + σ̇·ε̂: a = α̇ − σ̇·α/σ, b = σ̇/σ; factor (α̇ − σ̇α/σ)².

    Rectified flow (α = 1 − t, σ = t): a = −1/t, factor 1/t².
    """

    name = "velocity"

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        alpha, sigma = process.alpha(t), process.sigma(t)
        alpha_dot, sigma_dot = process.alpha_dot(t), process.sigma_dot(t)
        return alpha_dot - sigma_dot * alpha / sigma, sigma_dot / sigma


@TARGETS.register("v")
class VPV(Target):
    """Salimans–Ho v = α·ε̂ − σ·x̂0: a = −(α²/σ + σ), b = α/σ; factor (α²/σ + σ)².

    From v̂ − v = α(ε̂ − ε) − σ(x̂0 − x0) and ε̂ − ε = −(α/σ)(x̂0 − x0); for VP (α² + σ² = 1) the
    factor is 1/σ².
    """

    name = "v"

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        alpha, sigma = process.alpha(t), process.sigma(t)
        return -(alpha**2 / sigma + sigma), alpha / sigma


@TARGETS.register("F", "edm")
class EDMF(Target):
    """EDM's raw output F with D = c_skip·x + c_out·F in VE coordinates x = x_t/α, σ̃ = σ/α.

    a = 1/c_out(σ̃), b = −c_skip(σ̃)/(α·c_out(σ̃)); factor 1/c_out² = λ(σ̃). c_noise = ¼·ln σ̃
    whatever the process.
    """

    name = "F"

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not 0 < sigma_data < math.inf:
            raise ParameterError("sigma_data", sigma_data, "target F needs a positive number")
        self.sigma_data = float(sigma_data)

    def coefficients(self, t: TensorLike, process: Process) -> tuple[Tensor, Tensor]:
        sigma_ve = process.sigma_ve(t)
        c_out = edm_c_out(sigma_ve, self.sigma_data)
        c_skip = edm_c_skip(sigma_ve, self.sigma_data)
        return 1 / c_out, -c_skip / (process.alpha(t) * c_out)

    def c_noise(self, t: TensorLike, process: Process) -> Tensor:
        """¼·ln σ̃(t)."""
        return edm_c_noise(process.sigma_ve(t))

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_data": self.sigma_data}


def get_target(
    spec: str | Mapping[str, Any] | Target, sigma_data: float | None = None, **params: Any
) -> Target:
    """A target from its name (case-insensitive), a ``to_config()`` dict, or as is.

    ``sigma_data`` is a parameter of F only and ignored by the other targets (so callers can pass
    one value whatever the target).
    """
    if isinstance(spec, Target):
        return spec
    config = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = TARGETS.canonical(config.get("name", ""))
    if name == EDMF.name and sigma_data is not None:
        params["sigma_data"] = sigma_data
    return TARGETS.from_config({**config, **params, "name": name})


TARGET_NAMES: tuple[str, ...] = TARGETS.names
"""The canonical names ``get_target`` takes; ``TARGET_ALIASES`` lists the other spellings."""
TARGET_ALIASES: dict[str, str] = TARGETS.aliases
