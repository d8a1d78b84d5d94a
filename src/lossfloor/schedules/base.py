"""The noise-level distributions and weights users know (EDM, VE, VP, flow matching).

Each schedule gives, in VE σ (σ̃ = σ_t/α_t) and x0 units:
  sample(n, g)  σ ~ p(σ)
  density_ln_sigma(σ)    density of ln σ under p, q(ln σ) = p(σ)·σ
  weight(σ)     w(σ) with loss = w(σ)·‖D − x0‖² per element
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from lossfloor.errors import UserError

Tensor = torch.Tensor


def _f64(x: float | Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class NoiseSchedule(ABC):
    """p(σ) and w(σ) of a training objective."""

    name: str

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n noise levels σ ~ p(σ) (float64)."""

    @abstractmethod
    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        """Density of ln σ at σ (not log of the density): q(ln σ) = σ·p(σ)."""

    @abstractmethod
    def weight(self, sigma: float | Tensor) -> Tensor:
        """Loss weight w(σ) in x0 units."""

    def support(self) -> tuple[float, float]:
        """Interval of σ outside which p(σ) = 0 (or negligible: 1e-12 tail mass)."""
        return (1e-12, 1e12)

    def to_config(self) -> dict:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class EDMSchedule(NoiseSchedule):
    """EDM: ln σ ~ N(P_mean, P_std²), w(σ) = λ(σ) = (σ²+σ_d²)/(σσ_d)²."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    name = "edm"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.p_mean + self.p_std * z).exp()

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        u = (_f64(sigma).log() - self.p_mean) / self.p_std
        return torch.exp(-0.5 * u**2) / (self.p_std * math.sqrt(2 * math.pi))

    def weight(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        return (s**2 + self.sigma_data**2) / (s * self.sigma_data) ** 2

    def support(self) -> tuple[float, float]:
        k = 7.0  # 7 standard deviations: tail mass < 1e-11
        return (math.exp(self.p_mean - k * self.p_std), math.exp(self.p_mean + k * self.p_std))


@dataclass
class VESchedule(NoiseSchedule):
    """VE (NCSN++ in EDM's form): ln σ ~ U(ln σ_min, ln σ_max), w(σ) = 1/σ² (the ε/score loss)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    name = "ve"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + (hi - lo) * u).exp()

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        inside = (s >= self.sigma_min) & (s <= self.sigma_max)
        return inside.double() / (math.log(self.sigma_max) - math.log(self.sigma_min))

    def weight(self, sigma: float | Tensor) -> Tensor:
        return 1.0 / _f64(sigma) ** 2

    def support(self) -> tuple[float, float]:
        return (self.sigma_min, self.sigma_max)


@dataclass
class VPSchedule(NoiseSchedule):
    """VP (DDPM, linear β in continuous time): t ~ U(ε_t, 1), ᾱ(t) = exp(−½β_d t² − β_min t),
    σ̃ = √(1/ᾱ − 1); ε-prediction loss, so w(σ̃) = 1/σ̃²."""

    beta_min: float = 0.1
    beta_d: float = 19.9
    eps_t: float = 1e-5
    name = "vp"

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def _t(self, sigma: Tensor) -> Tensor:
        c = torch.log1p(sigma**2)  # ½β_d t² + β_min t = ln(1+σ̃²)
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * c)) / self.beta_d

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return self._sigma(self.eps_t + (1 - self.eps_t) * u)

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        # q(ln σ) = p_t(t)·dt/d ln σ, with d ln σ/dt = (β_d t + β_min)(1+σ²)/(2σ²)
        s = _f64(sigma)
        t = self._t(s)
        dlns_dt = (self.beta_d * t + self.beta_min) * (1 + s**2) / (2 * s**2)
        inside = (t >= self.eps_t) & (t <= 1.0)
        return inside.double() / ((1 - self.eps_t) * dlns_dt)

    def weight(self, sigma: float | Tensor) -> Tensor:
        return 1.0 / _f64(sigma) ** 2

    def support(self) -> tuple[float, float]:
        return (float(self._sigma(_f64(self.eps_t))), float(self._sigma(_f64(1.0))))


@dataclass
class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow: t ~ U(0, 1), σ̃ = t/(1−t); velocity loss, so w(σ̃) = 1/t² = ((1+σ̃)/σ̃)²."""

    name = "fm"

    def _t_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64)

    def _t_pdf(self, t: Tensor) -> Tensor:
        return ((t > 0) & (t < 1)).double()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = self._t_sample(n, generator).clamp(1e-7, 1 - 1e-7)
        return t / (1 - t)

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        t = s / (1 + s)
        return self._t_pdf(t) * t * (1 - t)  # dt/d ln σ̃ = t(1−t)

    def weight(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        return ((1 + s) / s) ** 2

    def support(self) -> tuple[float, float]:
        return (1e-7, 1e7)


@dataclass
class LogitNormalFlowSchedule(FlowMatchingSchedule):
    """Flow matching with logit-normal t (SD3): logit t ~ N(m, s²), i.e. ln σ̃ ~ N(m, s²)."""

    m: float = 0.0
    s: float = 1.0
    name = "fm-logit-normal"

    def _t_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        z = self.m + self.s * torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.sigmoid(z)

    def _t_pdf(self, t: Tensor) -> Tensor:
        u = (torch.logit(t) - self.m) / self.s
        return torch.exp(-0.5 * u**2) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))

    def support(self) -> tuple[float, float]:
        return (math.exp(self.m - 7 * self.s), math.exp(self.m + 7 * self.s))


_SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "edm": EDMSchedule,
    "ve": VESchedule,
    "vp": VPSchedule,
    "fm": FlowMatchingSchedule,
    "fm-logit-normal": LogitNormalFlowSchedule,
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def get_schedule(name: str, **kwargs: float) -> NoiseSchedule:
    """The schedule called ``name`` (see SCHEDULE_NAMES) with optional parameters."""
    if name not in _SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULE_NAMES)}")
    try:
        return _SCHEDULES[name](**kwargs)
    except TypeError as exc:
        raise UserError(f"schedule {name!r}: {exc}") from None
