"""``Denoiser``: any backbone, process and target as an EDM-style D(x, σ, labels) → x̂0.

x = x0 + σ̃·ε is in VE coordinates. With t = t(σ̃) and α = α(t), the process point is x_t = α·x;
the backbone sees x_in = c_in·x_t, c_in = 1/√(α²σ_d² + σ_t²) (= EDM's 1/√(σ̃² + σ_d²) applied to
x, so Var(x_in) = 1 when Var(x0) = σ_d²), and the target's c_noise, and its output is turned
into x̂0 by the target. Coefficients are computed in float64, then cast to x's dtype.

The wrapper speaks EDM's denoiser protocol (``sigma_min``, ``sigma_max``, ``sigma_data``,
``round_sigma``, ``label_dim``, ``forward(x, sigma, class_labels, augment_labels=...)``), so
EDM's and k-diffusion's samplers and losses can use it; ``read_protocol`` reads that protocol
from any object (an EDM network pickle, a wrapped k-diffusion model), so lossfloor's sampler and
diagnosis take those objects too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lossfloor.diffusion.processes import (
    EDM,
    VE,
    VPEDM,
    Process,
    TensorLike,
    as_sigma,
    get_process,
)
from lossfloor.diffusion.targets import EDMF, Target, edm_c_in, get_target
from lossfloor.errors import ParameterError, UserError

__all__ = [
    "Denoiser",
    "Protocol",
    "as_denoiser",
    "as_sigma",
    "check_output",
    "iddpm_levels",
    "read_protocol",
]

Backbone = Callable[..., Tensor]
DenoiserFn = Callable[..., Tensor]


def _identity_sigma(sigma: TensorLike) -> Tensor:
    """EDM's ``round_sigma`` of a continuous model: σ unchanged, as a tensor."""
    return torch.as_tensor(sigma)


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` (a module's ``forward`` for a Module) accepts the keyword ``name``."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume it does not
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def labels_for(
    labels: Tensor | None, n: int, label_dim: int, one_hot: bool, dtype: torch.dtype
) -> Tensor | None:
    """Class labels in the form a net takes: one-hot rows of ``label_dim`` (``one_hot``) or
    integer indices. Integer labels become one-hot rows and one-hot rows become indices as
    needed; a one-hot net gets zero rows for ``None`` (EDM's unconditional input)."""
    if label_dim == 0:
        return labels
    if labels is None:
        return torch.zeros(n, label_dim, dtype=dtype) if one_hot else None
    if labels.is_floating_point() and labels.ndim == 2:
        if one_hot:
            return labels.to(dtype)
        if labels.shape[1] != label_dim or not bool(((labels == 0) | (labels == 1)).all()):
            raise UserError(f"class labels: expected one-hot rows of {label_dim} or indices")
        return labels.argmax(dim=1)
    labels = labels.reshape(-1).long()
    if bool(((labels < 0) | (labels >= label_dim)).any()):
        raise UserError(f"class labels must lie in 0..{label_dim - 1}")
    return torch.nn.functional.one_hot(labels, label_dim).to(dtype) if one_hot else labels


def iddpm_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> Tensor:
    """iDDPM's M + 1 noise levels as EDM's iDDPMPrecond defines them (float64, decreasing):
    u_M = 0, u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C_1) − 1), ᾱ(j) = sin²(½π·j/(M(C_2 + 1)))."""
    if not (isinstance(M, int) and M >= 2):
        raise ParameterError("M", M, "must be an integer >= 2")
    if not (0 < C_1 <= 1 and 0 <= C_2 < math.inf):
        raise ParameterError("C_1", C_1, f"need 0 < C_1 <= 1 and C_2 >= 0 (C_2 = {C_2})")
    alpha_bar = [math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C_1) - 1)
    return torch.tensor(u, dtype=torch.float64)


class _NearestLevel:
    """A discrete model's levels u (decreasing): the index j(σ) = argmin_j |σ − u_j| (the first
    on a tie), c_noise = M − 1 − j(σ) and round_sigma(σ) = u_{j(σ)}, as EDM's iDDPMPrecond."""

    def __init__(self, levels: Tensor) -> None:
        self.levels = levels
        self.M = levels.numel() - 1

    def index(self, sigma: TensorLike) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return (s[..., None] - self.levels.to(s.device)).abs().argmin(-1)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (self.M - 1 - self.index(sigma)).to(torch.float64)

    def round(self, sigma: TensorLike) -> Tensor:
        s = torch.as_tensor(sigma)
        dtype = s.dtype if s.is_floating_point() else torch.float64
        return self.levels.to(s.device)[self.index(s)].to(dtype)


class _MeanChannels(torch.nn.Module):
    """The first C of a net's 2C output channels (mean; the other C are its learned variance)."""

    def __init__(self, net: Backbone) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:  # fmt: skip
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        return self.net(x_in, c_noise, labels, **extra)[:, : x_in.shape[1]]


class Denoiser(torch.nn.Module):
    """D(x, σ, labels) = target.to_x0(net(c_in·x_t, c_noise, labels), x_t, t), x_t = α(t(σ))·x.

    ``net(x_in, c_noise, labels)`` returns a prediction in the target's units; ``process`` and
    ``target`` are objects or names. ``scale_input=False`` feeds x_t unscaled. For target F,
    ``sigma_data`` must equal the target's. ``sigma_min``/``sigma_max``: the σ range the model
    supports (default the process's σ̃(t_min)…σ̃(t_max)); ``label_dim``: its number of classes
    (0: unconditional), ``one_hot``: whether the net takes one-hot rows instead of indices;
    ``c_noise``: a function of σ̃ replacing the target's noise conditioning; ``round_sigma``: the
    levels of a discrete model (default σ itself). To port EDM's networks use the presets
    ``Denoiser.edm``, ``.vp``, ``.ve`` and ``.iddpm``.
    """

    def __init__(
        self,
        net: Backbone,
        process: Process | str | Mapping[str, Any],
        target: Target | str | Mapping[str, Any],
        sigma_data: float = 0.5,
        scale_input: bool = True,
        *,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        label_dim: int = 0,
        one_hot: bool = False,
        c_noise: Callable[[Tensor], Tensor] | None = None,
        round_sigma: Callable[[TensorLike], Tensor] | None = None,
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
        p = self.process
        self.sigma_min = float(p.sigma_ve(p.t_min)) if sigma_min is None else float(sigma_min)
        self.sigma_max = float(p.sigma_ve(p.t_max)) if sigma_max is None else float(sigma_max)
        if not 0 <= self.sigma_min < self.sigma_max:
            raise ParameterError(
                "sigma_min", sigma_min, f"need 0 <= sigma_min < sigma_max = {self.sigma_max}"
            )
        if not (isinstance(label_dim, int) and label_dim >= 0):
            raise ParameterError("label_dim", label_dim, "must be an integer >= 0")
        self.label_dim, self.one_hot = label_dim, bool(one_hot)
        self._net_takes_augment = _takes_keyword(net, "augment_labels")
        self._c_noise, self._round_sigma = c_noise, round_sigma or _identity_sigma

    @classmethod
    def edm(
        cls, net: Backbone, sigma_data: float = 0.5, label_dim: int = 0, **kwargs: Any
    ) -> Denoiser:
        """EDM's EDMPrecond: D = c_skip·x + c_out·F(c_in·x, ¼ ln σ, labels) with
        c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²); σ ∈ [0, ∞).
        Labels reach ``net`` one-hot (``label_dim`` classes) as EDM's networks take them."""
        return cls(net, EDM(), EDMF(sigma_data), sigma_data, True, sigma_min=0.0,
                   sigma_max=math.inf, label_dim=label_dim, one_hot=True, **kwargs)  # fmt: skip

    @classmethod
    def vp(
        cls,
        net: Backbone,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        label_dim: int = 0,
        **kwargs: Any,
    ) -> Denoiser:
        """EDM's VPPrecond: D = x − σ·F(x/√(σ² + 1), (M − 1)·t(σ), labels),
        t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d; σ ∈ [σ(ε_t), σ(1)],
        σ(t) = √(exp(½β_d t² + β_min t) − 1). F is ε̂; x/√(σ² + 1) is x_t, fed unscaled."""
        if not 0 < epsilon_t < 1:
            raise ParameterError("epsilon_t", epsilon_t, "must be in (0, 1)")
        process = VPEDM(beta_d, beta_min, M)
        lo, hi = (float(process.sigma_ve(t)) for t in (epsilon_t, 1.0))
        return cls(net, process, "eps", scale_input=False, sigma_min=lo, sigma_max=hi,
                   label_dim=label_dim, one_hot=True, **kwargs)  # fmt: skip

    @classmethod
    def ve(
        cls,
        net: Backbone,
        sigma_min: float = 0.02,
        sigma_max: float = 100.0,
        label_dim: int = 0,
        **kwargs: Any,
    ) -> Denoiser:
        """EDM's VEPrecond: D = x + σ·F(x, ln(σ/2), labels), F = σ·score = −ε̂ (target
        ``sigma-score``); σ ∈ [sigma_min, sigma_max] (EDM's 0.02, 100)."""
        return cls(net, VE(sigma_min, sigma_max), "sigma-score", scale_input=False,
                   sigma_min=sigma_min, sigma_max=sigma_max, label_dim=label_dim, one_hot=True,
                   **kwargs)  # fmt: skip

    @classmethod
    def iddpm(
        cls,
        net: Backbone,
        C_1: float = 0.001,
        C_2: float = 0.008,
        M: int = 1000,
        label_dim: int = 0,
        levels: Tensor | None = None,
        **kwargs: Any,
    ) -> Denoiser:
        """EDM's iDDPMPrecond: D = x − σ·F(x/√(σ² + 1), M − 1 − j(σ), labels)[:, :C], j(σ) the
        nearest of iDDPM's levels u (``iddpm_levels``); round_sigma(σ) = u_j; σ ∈ [u_{M−1}, u_0].
        ``net`` outputs 2C channels (mean, learned variance); the variance half is dropped.
        ``levels``: the M + 1 levels to use instead (e.g. an EDM pickle's float32 ``u``)."""
        u = iddpm_levels(M, C_1, C_2) if levels is None else torch.as_tensor(levels).double()
        if u.shape != (M + 1,) or not bool((u[1:] < u[:-1]).all()):
            raise ParameterError("levels", tuple(u.shape), f"need {M + 1} decreasing levels")
        nearest = _NearestLevel(u.cpu())
        return cls(_MeanChannels(net), VPEDM(), "eps", scale_input=False,
                   sigma_min=float(u[M - 1]), sigma_max=float(u[0]), label_dim=label_dim,
                   one_hot=True, c_noise=nearest.c_noise, round_sigma=nearest.round,
                   **kwargs)  # fmt: skip

    def round_sigma(self, sigma: TensorLike) -> Tensor:
        """EDM's protocol: the σ the model is evaluated at (σ itself for continuous models, the
        nearest level for discrete ones)."""
        return self._round_sigma(sigma)

    def _point(self, x: Tensor, sigma: TensorLike) -> tuple[Tensor, Tensor, Tensor]:
        """(σ̃, t, α) in float64, each shaped [N, 1, …, 1]."""
        sigma_ve = as_sigma(sigma, x, torch.float64)
        t = self.process.t_of_sigma_ve(sigma_ve)
        return sigma_ve, t, self.process.alpha(t)

    def forward(
        self,
        x: Tensor,
        sigma: TensorLike,
        labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """x̂0 for x = x0 + σ̃·ε; σ̃ a float, [N] or [N, 1, …, 1]. Output has x's dtype.

        The net runs in its weights' dtype (x's for a net without weights), as EDM's
        preconditioners run theirs in float32 whatever x is; the coefficients and the output are
        in x's dtype. c_noise is passed flat ([N]) in float32 (float64 for a float64 net or
        input). ``labels``: class
        indices or one-hot rows (converted to what the net takes); ``augment_labels`` (EDM's
        augmentation conditioning) reach the net as a keyword when given.
        """
        sigma_ve, t, alpha = self._point(x, sigma)
        x_t = alpha.to(x.dtype) * x
        x_in = edm_c_in(sigma_ve, self.sigma_data).to(x.dtype) * x if self.scale_input else x_t
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        x_in = x_in if weight is None else x_in.to(weight.dtype)
        c_noise = self._c_noise(sigma_ve) if self._c_noise else self.target.c_noise(t, self.process)
        c_noise = c_noise.reshape(-1).to(torch.promote_types(x_in.dtype, torch.float32))
        y = labels_for(labels, x.shape[0], self.label_dim, self.one_hot, x_in.dtype)
        if y is not None:
            y = y.to(x.device)
        if augment_labels is None:
            pred = self.net(x_in, c_noise, y)
        elif self._net_takes_augment:
            pred = self.net(x_in, c_noise, y, augment_labels=augment_labels)
        else:
            raise UserError("augment_labels given but the backbone takes no augment_labels")
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


@dataclass(frozen=True)
class Protocol:
    """EDM's denoiser protocol as read from a model: its σ range, σ_data (None if it has none),
    number of classes (0: unconditional) and ``round_sigma``."""

    sigma_min: float
    sigma_max: float
    sigma_data: float | None
    label_dim: int
    round_sigma: Callable[[TensorLike], Tensor]


def read_protocol(model: Any, strict: bool = False) -> Protocol:
    """The protocol of any denoiser object, by duck typing: ``sigma_min``, ``sigma_max``,
    ``sigma_data``, ``label_dim``, ``round_sigma`` where present. A plain callable D(x, σ, labels)
    gets [0, ∞), no σ_data, no classes and σ unchanged; ``strict`` requires the σ range (a model
    named on the command line). Wrong types are one-line errors."""
    kind = type(model).__name__
    if not callable(model):
        raise UserError(
            f"an object of type {kind} is not a denoiser: it is not callable as D(x, sigma, labels)"
        )
    missing = [a for a in ("sigma_min", "sigma_max") if not hasattr(model, a)]
    if strict and missing:
        raise UserError(
            f"a {kind} lacks the denoiser protocol: no {' or '.join(missing)} "
            "(wrap it in lossfloor.diffusion.Denoiser or add the attributes)"
        )
    try:
        lo = float(getattr(model, "sigma_min", 0.0))
        hi = float(getattr(model, "sigma_max", math.inf))
        sigma_data = getattr(model, "sigma_data", None)
        sigma_data = None if sigma_data is None else float(sigma_data)
        label_dim = int(getattr(model, "label_dim", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise UserError(f"a {kind} has a malformed denoiser protocol ({exc})") from None
    if not 0 <= lo < hi:
        raise UserError(f"a {kind} declares the σ range [{lo}, {hi}]; need 0 <= min < max")
    round_sigma = getattr(model, "round_sigma", _identity_sigma)
    if not callable(round_sigma):
        raise UserError(f"a {kind}'s round_sigma is not callable")
    return Protocol(lo, hi, sigma_data, label_dim, round_sigma)


def as_denoiser(model: Any) -> DenoiserFn:
    """``model`` as D(x, σ, labels) taking integer class labels (an object with ``label_dim`` > 0
    other than a lossfloor ``Denoiser``, e.g. an EDM network, which takes one-hot rows, behind a
    converter), its every output checked by ``check_output``: what diagnosis, sampling and the
    gap monitor evaluate."""
    protocol = read_protocol(model)
    convert = not isinstance(model, Denoiser) and protocol.label_dim > 0

    def denoise(x: Tensor, sigma: TensorLike, labels: Tensor | None = None) -> Tensor:
        if convert:
            y = labels_for(labels, x.shape[0], protocol.label_dim, True, torch.float32)
            labels = None if y is None else y.to(x.device)
        return check_output(model(x, sigma, labels), x, sigma)

    return denoise


def check_output(out: Any, x: Tensor, sigma: TensorLike) -> Tensor:
    """``out`` = D(x, σ) if it is a tensor shaped like ``x`` with finite values; else a
    one-line UserError (for non-finite values, at the σ of the first image that has one)."""
    if not isinstance(out, Tensor):
        raise UserError(
            f"the model returned a {type(out).__name__}, not a tensor of images shaped like its "
            "input"
        )
    if out.shape != x.shape:
        raise UserError(
            f"the model's output has shape {tuple(out.shape)} for an input of shape "
            f"{tuple(x.shape)}; a denoiser returns one image per input image, shaped like it"
        )
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        row = int((~finite).reshape(len(out), -1).any(1).nonzero()[0, 0])
        sigmas = torch.as_tensor(sigma).flatten()
        at = float(sigmas[row] if sigmas.numel() > 1 else sigmas[0])
        raise UserError(f"the model's output is not finite at σ = {at:g}")
    return out
