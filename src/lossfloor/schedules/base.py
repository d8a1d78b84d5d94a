"""The noise-level distributions and weights users know (EDM, VE, VP, flow matching), standing on
the process and target objects of ``lossfloor.diffusion`` (docs/method.md §1).

Each schedule gives, in VE σ (σ̃ = σ_t/α_t) and x0 units:
  sample(n, g)          σ ~ p(σ)
  density_ln_sigma(σ)   density of ln σ under p, q(ln σ) = p(σ)·σ
  weight(σ)             w(σ) with loss = w(σ)·‖D − x0‖² per element
A schedule that draws the time t of a process (VP, flow matching: ``ProcessTimeSchedule``) maps
it with the process's σ̃(t), and q(ln σ̃) = p_t(t)/(d ln σ̃/dt) with d ln σ̃/dt = σ̇/σ − α̇/α from
the process's derivatives at t = t(σ̃). Weights are a target's loss factor (ε: α²/σ² = 1/σ̃²,
velocity: (α̇ − σ̇α/σ)²) or EDM's λ(σ) = 1/c_out².

**Consistency with a model** (``check``; the trainer calls it with the Denoiser's process, target
and σ_data): a schedule with a σ_data (EDM's λ) must have the model's σ_data, which target F
shares; a schedule that draws t of a process must describe the same σ̃(t) as a model process of
that family (e.g. VP's β_min and β_d against a vp-linear or vp-edm model). Processes of other
families and any target are accepted: the schedule is then a density over σ̃ and a weight in x0
units, which is what the trainer uses. Every default combination is consistent.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from lossfloor.diffusion.processes import VE, VPEDM, FlowMatching, Process, VPLinear
from lossfloor.diffusion.targets import Epsilon, Target, Velocity, edm_lambda
from lossfloor.errors import ParameterError, UserError
from lossfloor.registry import Registry

Tensor = torch.Tensor


def _f64(x: float | Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _loss_factor(target: Target, process: Process, sigma: float | Tensor) -> Tensor:
    """The target's loss factor (target loss / x0 loss) at VE level σ̃ of the process."""
    return target.loss_factor(process.t_of_sigma_ve(_f64(sigma)), process)


def dlog_sigma_ve_dt(process: Process, t: Tensor) -> Tensor:
    """d ln σ̃/dt = σ̇/σ − α̇/α (σ̃ = σ/α), from the process's closed-form derivatives."""
    return process.sigma_dot(t) / process.sigma(t) - process.alpha_dot(t) / process.alpha(t)


SCHEDULES: Registry[NoiseSchedule] = Registry("schedule")


class NoiseSchedule(ABC):
    """p(σ) and w(σ) of a training objective; a dataclass of its parameters."""

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

    def check(self, process: Process, target: Target, sigma_data: float) -> None:
        """UserError unless a model of this process, target and σ_data is consistent with the
        schedule (module docstring); nothing to check by default."""
        return None

    def sample_with_weights(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(σ ~ p, w(σ) in x0 units) for any loop (``schedules.fit.sample_with_weights``)."""
        from lossfloor.schedules.fit import sample_with_weights

        return sample_with_weights(self, n, generator)

    def sample_timesteps(
        self, n: int, scheduler: Any, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(a diffusers scheduler's timesteps drawn by this density, weights in its prediction
        units) (``schedules.fit.sample_timesteps``)."""
        from lossfloor.schedules.fit import sample_timesteps

        return sample_timesteps(self, n, scheduler, generator)

    def to_config(self) -> dict[str, Any]:
        """The name and parameters, JSON-serialisable (``get_schedule`` rebuilds it)."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@SCHEDULES.register("edm")
@dataclass
class EDMSchedule(NoiseSchedule):
    """EDM: ln σ ~ N(P_mean, P_std²), w(σ) = λ(σ) = (σ²+σ_d²)/(σσ_d)² (``edm_lambda``)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    name = "edm"

    def __post_init__(self) -> None:
        for param in ("p_std", "sigma_data"):
            if not 0 < getattr(self, param) < math.inf:
                raise ParameterError(param, getattr(self, param), "must be a positive number")

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.p_mean + self.p_std * z).exp()

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        u = (_f64(sigma).log() - self.p_mean) / self.p_std
        return torch.exp(-0.5 * u**2) / (self.p_std * math.sqrt(2 * math.pi))

    def weight(self, sigma: float | Tensor) -> Tensor:
        return edm_lambda(sigma, self.sigma_data)

    def support(self) -> tuple[float, float]:
        k = 7.0  # 7 standard deviations: tail mass < 1e-11
        return (math.exp(self.p_mean - k * self.p_std), math.exp(self.p_mean + k * self.p_std))

    def check(self, process: Process, target: Target, sigma_data: float) -> None:
        """λ(σ) and the model (c_in, target F) must use one σ_data."""
        if self.sigma_data != sigma_data:
            raise UserError(
                f"schedule edm has sigma_data={self.sigma_data} but the model has "
                f"sigma_data={sigma_data} (EDM's λ and target F share it); pass the same value"
            )


@SCHEDULES.register("ve")
@dataclass
class VESchedule(NoiseSchedule):
    """VE (NCSN++ in EDM's form): ln σ ~ U(ln σ_min, ln σ_max); w(σ) = the ε loss factor of the
    VE process on [σ_min, σ_max], α²/σ² = 1/σ²."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    name = "ve"

    def __post_init__(self) -> None:
        self.process = VE(self.sigma_min, self.sigma_max)  # also checks the range

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + (hi - lo) * u).exp()

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        inside = (s >= self.sigma_min) & (s <= self.sigma_max)
        return inside.double() / (math.log(self.sigma_max) - math.log(self.sigma_min))

    def weight(self, sigma: float | Tensor) -> Tensor:
        return _loss_factor(Epsilon(), self.process, sigma)

    def support(self) -> tuple[float, float]:
        return (self.sigma_min, self.sigma_max)


class ProcessTimeSchedule(NoiseSchedule):
    """t ~ p_t of ``self.process``, σ̃ = σ̃(t); w(σ̃) = ``self.target``'s loss factor.

    q(ln σ̃) = p_t(t)/(d ln σ̃/dt) at t = t(σ̃). A model process of the class ``family`` must
    have the same σ̃(t) (``check``).
    """

    process: Process
    target: Target
    family: type[Process]

    @abstractmethod
    def _t_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        """n times t ~ p_t (float64)."""

    @abstractmethod
    def _t_pdf(self, t: Tensor) -> Tensor:
        """p_t(t)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.process.sigma_ve(self._t_sample(n, generator))

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        t = self.process.t_of_sigma_ve(_f64(sigma))
        return self._t_pdf(t) / dlog_sigma_ve_dt(self.process, t)

    def weight(self, sigma: float | Tensor) -> Tensor:
        return _loss_factor(self.target, self.process, sigma)

    def check(self, process: Process, target: Target, sigma_data: float) -> None:
        """A model process of ``family`` must give the same σ̃(t) on the schedule's t range."""
        if not isinstance(process, self.family):
            return
        mine = self.process
        t = torch.linspace(mine.t_min, mine.t_max, 17, dtype=torch.float64)
        if not torch.allclose(process.sigma_ve(t), mine.sigma_ve(t), rtol=1e-9, atol=0.0):
            raise UserError(
                f"schedule {self.name} draws t of {mine.to_config()} but the model's process is "
                f"{process.to_config()}; give both the same parameters"
            )


@SCHEDULES.register("vp")
@dataclass
class VPSchedule(ProcessTimeSchedule):
    """VP (DDPM, EDM's VP): t ~ U(ε_t, 1) of the vp-edm process (ᾱ(t) = exp(−½β_d t² − β_min t),
    σ̃ = √(1/ᾱ − 1)); ε-prediction loss, so w(σ̃) = 1/σ̃²."""

    beta_min: float = 0.1
    beta_d: float = 19.9
    eps_t: float = 1e-5
    name = "vp"
    family = VPLinear

    def __post_init__(self) -> None:
        if not 0 < self.eps_t < 1:
            raise ParameterError("eps_t", self.eps_t, "must be in (0, 1)")
        self.process = VPEDM(self.beta_d, self.beta_min)
        self.target = Epsilon()

    def _t_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return self.eps_t + (1 - self.eps_t) * u

    def _t_pdf(self, t: Tensor) -> Tensor:
        return ((t >= self.eps_t) & (t <= 1.0)).double() / (1 - self.eps_t)

    def support(self) -> tuple[float, float]:
        return (float(self.process.sigma_ve(self.eps_t)), float(self.process.sigma_ve(1.0)))


@SCHEDULES.register("fm")
@dataclass
class FlowMatchingSchedule(ProcessTimeSchedule):
    """Rectified flow: t ~ U(0, 1) of the fm process (σ̃ = t/(1−t)); velocity loss, so
    w(σ̃) = 1/t² = ((1+σ̃)/σ̃)². t is clamped to [1e-7, 1 − 1e-7]."""

    name = "fm"
    family = FlowMatching

    def __post_init__(self) -> None:
        self.process = FlowMatching()
        self.target = Velocity()

    def _t_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64)

    def _t_pdf(self, t: Tensor) -> Tensor:
        return ((t > 0) & (t < 1)).double()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.process.sigma_ve(self._t_sample(n, generator).clamp(1e-7, 1 - 1e-7))

    def support(self) -> tuple[float, float]:
        return (1e-7, 1e7)


@SCHEDULES.register("fm-logit-normal")
@dataclass
class LogitNormalFlowSchedule(FlowMatchingSchedule):
    """Flow matching with logit-normal t (SD3): logit t ~ N(m, s²), i.e. ln σ̃ ~ N(m, s²)."""

    m: float = 0.0
    s: float = 1.0
    name = "fm-logit-normal"

    def __post_init__(self) -> None:
        if not 0 < self.s < math.inf:
            raise ParameterError("s", self.s, "must be a positive number")
        super().__post_init__()

    def _t_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        z = self.m + self.s * torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.sigmoid(z)

    def _t_pdf(self, t: Tensor) -> Tensor:
        u = (torch.logit(t) - self.m) / self.s
        return torch.exp(-0.5 * u**2) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))

    def support(self) -> tuple[float, float]:
        return (math.exp(self.m - 7 * self.s), math.exp(self.m + 7 * self.s))


SCHEDULE_NAMES: tuple[str, ...] = SCHEDULES.names


def get_schedule(
    spec: str | Mapping[str, Any] | NoiseSchedule, sigma_data: float | None = None, **params: Any
) -> NoiseSchedule:
    """A schedule from its name (case-insensitive; ``params`` override its defaults), from a
    ``to_config()`` dict, or returned as is.

    ``sigma_data`` (the data's standard deviation) is given to schedules that have one (EDM's λ)
    unless ``spec`` or ``params`` set it, and ignored by the others.
    """
    if isinstance(spec, NoiseSchedule):
        return spec
    config = {**(dict(spec) if isinstance(spec, Mapping) else {"name": spec}), **params}
    schedule = SCHEDULES.from_config(config)
    if sigma_data is not None and "sigma_data" not in config and hasattr(schedule, "sigma_data"):
        schedule = replace(schedule, sigma_data=sigma_data)  # type: ignore[type-var]
    return schedule
