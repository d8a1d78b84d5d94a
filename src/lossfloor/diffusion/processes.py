"""Forward processes x_t = α(t)·x0 + σ(t)·ε and their map to VE coordinates σ̃ = σ/α.

Every method takes a float or a tensor of times and returns a float64 tensor of the same shape
(on the input's device). Derivatives are closed forms; ``t_of_sigma_ve`` inverts ``sigma_ve``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lossfloor.errors import UserError
from lossfloor.registry import Registry

TensorLike = float | Tensor


def _f64(value: TensorLike) -> Tensor:
    """``value`` as a float64 tensor on its own device (CPU for Python numbers)."""
    return torch.as_tensor(value, dtype=torch.float64)


def as_sigma(value: TensorLike, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A per-sample scalar (σ, t or a coefficient) shaped [N, 1, …, 1] to broadcast against x.

    Accepts a float, a 0-d tensor, a tensor of shape [1] or [N], or one of shape [1 or N, 1, …, 1]
    with x.ndim dims; N = x.shape[0]. The result is on x's device in ``dtype`` (default x.dtype).
    """
    if x.ndim == 0:
        raise ValueError("as_sigma: x needs a batch dimension, got a 0-d tensor")
    v = torch.as_tensor(value, device=x.device, dtype=dtype or x.dtype)
    n = x.shape[0]
    ok = (v.ndim <= 1 and v.numel() in (1, n)) or (
        v.ndim == x.ndim and v.shape[0] in (1, n) and all(s == 1 for s in v.shape[1:])
    )
    if not ok:
        raise ValueError(
            f"as_sigma: a per-sample value of shape {tuple(v.shape)} does not fit a batch of "
            f"shape {tuple(x.shape)}; pass a float, shape [{n}] or [{n}{', 1' * (x.ndim - 1)}]"
        )
    return v.reshape(-1, *([1] * (x.ndim - 1))).expand(n, *([1] * (x.ndim - 1)))


PROCESSES: Registry[Process] = Registry("process")


class Process(ABC):
    """x_t = α(t)·x0 + σ(t)·ε on t ∈ [t_min, t_max]; σ̃(t) = σ(t)/α(t) is its VE noise level."""

    name: str
    t_min: float
    t_max: float

    @abstractmethod
    def alpha(self, t: TensorLike) -> Tensor:
        """α(t), the signal scale."""

    @abstractmethod
    def sigma(self, t: TensorLike) -> Tensor:
        """σ(t), the noise scale."""

    @abstractmethod
    def alpha_dot(self, t: TensorLike) -> Tensor:
        """dα/dt."""

    @abstractmethod
    def sigma_dot(self, t: TensorLike) -> Tensor:
        """dσ/dt."""

    @abstractmethod
    def t_of_sigma_ve(self, sigma_ve: TensorLike) -> Tensor:
        """The t with σ(t)/α(t) = sigma_ve (σ̃ increases with t, so t is unique)."""

    @abstractmethod
    def c_noise(self, t: TensorLike) -> Tensor:
        """The network's noise conditioning at t (what the backbone was trained to take)."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The name and parameters, JSON-serialisable."""

    def sigma_ve(self, t: TensorLike) -> Tensor:
        """σ̃(t) = σ(t)/α(t)."""
        return self.sigma(t) / self.alpha(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"


@PROCESSES.register("ve")
class VE(Process):
    """Variance exploding (NCSN): α = 1, σ = t, so t is σ̃. c_noise = ln(σ/2) (EDM's VEPrecond).

    Default range σ ∈ [0.02, 100]: EDM's VEPrecond and lossfloor's ``ve`` schedule (Song et al.
    2021 used [0.01, 50] on CIFAR-10; pass it explicitly for those models).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        if not 0 < sigma_min < sigma_max < math.inf:
            raise UserError(
                f"{self.name}: need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}"
            )
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t: TensorLike) -> Tensor:
        return torch.ones_like(_f64(t))

    def sigma(self, t: TensorLike) -> Tensor:
        return _f64(t).clone()

    def alpha_dot(self, t: TensorLike) -> Tensor:
        return torch.zeros_like(_f64(t))

    def sigma_dot(self, t: TensorLike) -> Tensor:
        return torch.ones_like(_f64(t))

    def sigma_ve(self, t: TensorLike) -> Tensor:
        return _f64(t).clone()

    def t_of_sigma_ve(self, sigma_ve: TensorLike) -> Tensor:
        """t = σ̃."""
        return _f64(sigma_ve).clone()

    def c_noise(self, t: TensorLike) -> Tensor:
        """ln(σ/2)."""
        return torch.log(0.5 * _f64(t))

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_min": self.t_min, "sigma_max": self.t_max}


@PROCESSES.register("edm")
class EDM(VE):
    """EDM (Karras et al. 2022): α = 1, σ = t as in VE; c_noise = ¼·ln σ. Range σ ∈ [0.002, 80]."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        super().__init__(sigma_min, sigma_max)

    def c_noise(self, t: TensorLike) -> Tensor:
        """¼·ln σ."""
        return 0.25 * torch.log(_f64(t))


@PROCESSES.register("vp-linear", "vp")
class VPLinear(Process):
    """Continuous-time DDPM, linear β(t) = β_min + (β_max − β_min)·t on t ∈ [1e-5, 1].

    ᾱ(t) = exp(−B(t)), B(t) = ½(β_max − β_min)t² + β_min·t; α = √ᾱ, σ = √(1 − ᾱ),
    σ̃ = √(e^B − 1). Inverse: B = ln(1 + σ̃²), t = 2B / (β_min + √(β_min² + 2(β_max − β_min)B))
    (the root of the quadratic, written without cancellation). c_noise = 999·t (EDM's VPPrecond).
    """

    name = "vp-linear"
    t_min = 1e-5
    t_max = 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 <= beta_min < beta_max < math.inf:
            raise UserError(
                f"{self.name}: need 0 <= beta_min < beta_max < inf, got {beta_min}, {beta_max}"
            )
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self._beta_d = self.beta_max - self.beta_min

    def _b(self, t: Tensor) -> Tensor:
        """B(t) = ½β_d·t² + β_min·t = −ln ᾱ(t)."""
        return 0.5 * self._beta_d * t**2 + self.beta_min * t

    def _b_dot(self, t: Tensor) -> Tensor:
        """B'(t) = β(t) = β_d·t + β_min."""
        return self._beta_d * t + self.beta_min

    def alpha(self, t: TensorLike) -> Tensor:
        """exp(−B/2)."""
        return torch.exp(-0.5 * self._b(_f64(t)))

    def sigma(self, t: TensorLike) -> Tensor:
        """√(1 − e^(−B))."""
        return torch.sqrt(-torch.expm1(-self._b(_f64(t))))

    def alpha_dot(self, t: TensorLike) -> Tensor:
        """−½·B'·α."""
        t = _f64(t)
        return -0.5 * self._b_dot(t) * self.alpha(t)

    def sigma_dot(self, t: TensorLike) -> Tensor:
        """B'·α²/(2σ)."""
        t = _f64(t)
        return self._b_dot(t) * self.alpha(t) ** 2 / (2 * self.sigma(t))

    def sigma_ve(self, t: TensorLike) -> Tensor:
        """√(e^B − 1)."""
        return torch.sqrt(torch.expm1(self._b(_f64(t))))

    def t_of_sigma_ve(self, sigma_ve: TensorLike) -> Tensor:
        """2B/(β_min + √(β_min² + 2β_d·B)), B = ln(1 + σ̃²)."""
        b = torch.log1p(_f64(sigma_ve) ** 2)
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self._beta_d * b))

    def c_noise(self, t: TensorLike) -> Tensor:
        """999·t."""
        return 999.0 * _f64(t)

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


@PROCESSES.register("vp-edm")
class VPEDM(VPLinear):
    """EDM's VP: σ̃(t) = √(exp(½β_d·t² + β_min·t) − 1), β_d = 19.9, β_min = 0.1, t ∈ [1e-5, 1].

    α = 1/√(1 + σ̃²), σ = α·σ̃. This is VPLinear with β_max = β_min + β_d (the same curve, EDM's
    parameters); c_noise = (M − 1)·t as in EDM's VPPrecond (M = 1000 DDPM steps: 999·t).
    """

    name = "vp-edm"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000) -> None:
        if not 0 < beta_d < math.inf:
            raise UserError(f"{self.name}: need 0 < beta_d < inf, got {beta_d}")
        if not (isinstance(M, int) and M >= 2):
            raise UserError(f"{self.name}: need an integer M >= 2, got {M!r}")
        super().__init__(beta_min, beta_min + beta_d)
        self._beta_d = float(beta_d)
        self.M = M

    def c_noise(self, t: TensorLike) -> Tensor:
        """(M − 1)·t."""
        return (self.M - 1) * _f64(t)

    def to_config(self) -> dict[str, Any]:
        """Name, β_d, β_min, and M when it is not EDM's 1000 (older configs stay the same)."""
        extra = {} if self.M == 1000 else {"M": self.M}
        return {"name": self.name, "beta_d": self._beta_d, "beta_min": self.beta_min, **extra}


@PROCESSES.register("vp-cosine")
class VPCosine(Process):
    """Nichol–Dhariwal cosine schedule on t ∈ [1e-5, 0.999].

    ᾱ(t) = cos²θ(t)/cos²θ₀, θ(t) = (t + s)/(1 + s)·π/2, θ₀ = θ(0), s = 0.008; α = cos θ/cos θ₀,
    σ² = 1 − α² = sin(θ − θ₀)·sin(θ + θ₀)/cos²θ₀ (no cancellation at small t).
    Inverse: tan²θ = tan²θ₀ + σ̃²/cos²θ₀, and θ − θ₀ = arctan((tan θ − tan θ₀)/(1 + tan θ·tan θ₀))
    with tan θ − tan θ₀ = (σ̃²/cos²θ₀)/(tan θ + tan θ₀). c_noise = 999·t (as for the other VPs).
    """

    name = "vp-cosine"
    t_min = 1e-5
    t_max = 0.999

    def __init__(self, s: float = 0.008) -> None:
        if not 0 <= s < math.inf:
            raise UserError(f"{self.name}: need 0 <= s < inf, got {s}")
        self.s = float(s)
        self._k = math.pi / (2 * (1 + self.s))  # dθ/dt
        self._theta0 = self.s * self._k

    def alpha(self, t: TensorLike) -> Tensor:
        """cos θ/cos θ₀."""
        return torch.cos(self._theta0 + self._k * _f64(t)) / math.cos(self._theta0)

    def sigma(self, t: TensorLike) -> Tensor:
        """√(sin(θ − θ₀)·sin(θ + θ₀))/cos θ₀."""
        kt = self._k * _f64(t)
        return torch.sqrt(torch.sin(kt) * torch.sin(kt + 2 * self._theta0)) / math.cos(self._theta0)

    def alpha_dot(self, t: TensorLike) -> Tensor:
        """−k·sin θ/cos θ₀, k = dθ/dt = π/(2(1 + s))."""
        return -self._k * torch.sin(self._theta0 + self._k * _f64(t)) / math.cos(self._theta0)

    def sigma_dot(self, t: TensorLike) -> Tensor:
        """−α·α̇/σ (from α² + σ² = 1)."""
        t = _f64(t)
        return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)

    def t_of_sigma_ve(self, sigma_ve: TensorLike) -> Tensor:
        """(θ − θ₀)/k from the arctan difference in the class docstring."""
        c2 = _f64(sigma_ve) ** 2 / math.cos(self._theta0) ** 2
        b = math.tan(self._theta0)
        a = torch.sqrt(b**2 + c2)
        return torch.atan(c2 / ((a + b) * (1 + a * b))) / self._k

    def c_noise(self, t: TensorLike) -> Tensor:
        """999·t."""
        return 999.0 * _f64(t)

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "s": self.s}


@PROCESSES.register("fm", "flow", "rectified-flow")
class FlowMatching(Process):
    """Rectified flow: α = 1 − t, σ = t, σ̃ = t/(1 − t), t = σ̃/(1 + σ̃); t ∈ [1e-5, 0.999].

    c_noise = 1000·t (the timestep diffusers' FlowMatchEulerDiscreteScheduler passes).
    """

    name = "fm"
    t_min = 1e-5
    t_max = 0.999

    def alpha(self, t: TensorLike) -> Tensor:
        return 1 - _f64(t)

    def sigma(self, t: TensorLike) -> Tensor:
        return _f64(t).clone()

    def alpha_dot(self, t: TensorLike) -> Tensor:
        return -torch.ones_like(_f64(t))

    def sigma_dot(self, t: TensorLike) -> Tensor:
        return torch.ones_like(_f64(t))

    def t_of_sigma_ve(self, sigma_ve: TensorLike) -> Tensor:
        """σ̃/(1 + σ̃)."""
        s = _f64(sigma_ve)
        return s / (1 + s)

    def c_noise(self, t: TensorLike) -> Tensor:
        """1000·t."""
        return 1000.0 * _f64(t)

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name}


@PROCESSES.register("vp-discrete")
class VPDiscrete(Process):
    """A discrete VP model (e.g. diffusers' DDPMScheduler) given ᾱ at integer timesteps 0…T−1.

    t is the timestep as a float. At integer t: α = √ᾱ[t], σ = √(1 − ᾱ[t]). Between (and beyond,
    on the end segments) the log-SNR λ = ln(ᾱ/(1 − ᾱ)) is linear in t, so α = √sigmoid(λ),
    σ = √sigmoid(−λ), σ̃ = e^(−λ/2), α̇ = ½·α·σ²·λ', σ̇ = −½·σ·α²·λ' with λ' the segment's slope
    (at an integer t the segment to its right; at T−1 the last one). ``t_of_sigma_ve`` inverts this
    exactly: linear interpolation of t in ln σ̃. c_noise = t (what diffusers UNets take).
    """

    name = "vp-discrete"

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise UserError(
                f"{self.name}: alphas_cumprod must be 1-D with at least 2 steps, "
                f"got shape {tuple(ac.shape)}"
            )
        if not (bool(((ac > 0) & (ac < 1)).all()) and bool((ac[1:] < ac[:-1]).all())):
            raise UserError(
                f"{self.name}: alphas_cumprod must lie in (0, 1) and strictly decrease with t"
            )
        self.alphas_cumprod = ac
        self._lam = torch.log(ac) - torch.log1p(-ac)
        self._log_sigma_ve = -0.5 * self._lam
        self.t_min, self.t_max = 0.0, float(ac.numel() - 1)

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(λ(t), λ'(t)) on the segment [k, k + 1] holding t, k clamped to 0…T−2."""
        lam = self._lam.to(t.device)
        k = torch.floor(t).clamp(0, lam.numel() - 2).long()
        slope = lam[k + 1] - lam[k]
        return lam[k] + slope * (t - k), slope

    def alpha(self, t: TensorLike) -> Tensor:
        """√sigmoid(λ)."""
        return torch.sqrt(torch.sigmoid(self._segment(_f64(t))[0]))

    def sigma(self, t: TensorLike) -> Tensor:
        """√sigmoid(−λ)."""
        return torch.sqrt(torch.sigmoid(-self._segment(_f64(t))[0]))

    def alpha_dot(self, t: TensorLike) -> Tensor:
        """½·α·σ²·λ'."""
        lam, slope = self._segment(_f64(t))
        return 0.5 * torch.sqrt(torch.sigmoid(lam)) * torch.sigmoid(-lam) * slope

    def sigma_dot(self, t: TensorLike) -> Tensor:
        """−½·σ·α²·λ'."""
        lam, slope = self._segment(_f64(t))
        return -0.5 * torch.sqrt(torch.sigmoid(-lam)) * torch.sigmoid(lam) * slope

    def sigma_ve(self, t: TensorLike) -> Tensor:
        """e^(−λ/2)."""
        return torch.exp(-0.5 * self._segment(_f64(t))[0])

    def t_of_sigma_ve(self, sigma_ve: TensorLike) -> Tensor:
        """k + (ln σ̃ − ln σ̃[k])/(ln σ̃[k+1] − ln σ̃[k]) on the segment holding ln σ̃."""
        log_s = torch.log(_f64(sigma_ve))
        table = self._log_sigma_ve.to(log_s.device)
        k = (torch.searchsorted(table, log_s.contiguous(), right=True) - 1).clamp(
            0, table.numel() - 2
        )
        return k + (log_s - table[k]) / (table[k + 1] - table[k])

    def c_noise(self, t: TensorLike) -> Tensor:
        """t."""
        return _f64(t).clone()

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "alphas_cumprod": self.alphas_cumprod.tolist()}


def get_process(spec: str | Mapping[str, Any] | Process, **params: Any) -> Process:
    """A process from its name (case-insensitive; ``params`` override its defaults), from a
    ``to_config()`` dict, or returned as is."""
    if isinstance(spec, Process):
        return spec
    if isinstance(spec, Mapping):
        return PROCESSES.from_config({**spec, **params})
    return PROCESSES.create(spec, **params)


PROCESS_NAMES: tuple[str, ...] = PROCESSES.names
"""The canonical names ``get_process`` takes; ``PROCESS_ALIASES`` lists the other spellings."""
PROCESS_ALIASES: dict[str, str] = PROCESSES.aliases
