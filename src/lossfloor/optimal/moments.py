"""The statistics of one σ: the outer average of both forms of J*(σ) over M per-draw values,
their combination and standard errors, how many draws carry the value, and the draws a target
error needs (docs/method.md §2–3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch

from lossfloor.diffusion import Process, Target
from lossfloor.errors import ParameterError
from lossfloor.optimal.capabilities import resolve_option
from lossfloor.optimal.curve import CurvePoint
from lossfloor.optimal.estimators import Estimator, PerSample

Tensor = torch.Tensor

#: A point is ``resolved`` where at least this many draws carry its value (``effective_draws``):
#: on two points in 16 dims (M = 8000, plain draws) ESS ≈ 1–3 at σ = 0.6, where s/√M was 2–7×
#: too small, and ≈ 25–35 at σ = 0.8, where the values were within 1–2 s of the exact one.
MIN_EFFECTIVE_DRAWS = 30.0

#: The combination leaves the closed form out where its rounding bound exceeds this share of
#: its standard error and it disagrees with the direct form by more than FORMS_AGREE standard
#: errors of their difference (tilted draws, ``Moments.from_samples``).
CLOSED_ROUNDING_SHARE = 0.1
FORMS_AGREE = 2.0

#: The form's option, as a type (``estimate_curve``'s signature) and as a tuple.
Form = Literal["auto", "closed", "direct", "combined"]
FORMS: tuple[Form, ...] = get_args(Form)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """(mean, s/√M) of M per-sample values (the i.i.d. formula; stratified sources make it
    conservative)."""
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


def control_variate(values: Tensor, weight: Tensor) -> Tensor:
    """v − β̂·(w − 1), β̂ = Cov(v, w)/Var(w), for per-draw values v on importance-sampled draws
    with likelihood ratios w: the regression estimator with the control w − 1, whose mean is
    exactly 0 (E_q[φ/q] = 1; Owen & Zhou 2000, mixture importance sampling with the mixture's
    density ratios as control variates). Its mean is v̄ − β̂(w̄ − 1), unbiased up to O(1/M), and
    its variance per draw Var(v)·(1 − ρ²(v, w)): never above plain IS (β = 0) nor the
    self-normalised Σwf/Σw (whose linearisation is β = J*), so s/√M of the returned values is
    the regression estimator's standard error (β̂'s own noise adds O(1/M) relative). The tilted
    w ≤ 1/(1 − α) is bounded, so the control cannot fit away an isolated large draw (a rare
    event) and hide it from s. ``values`` unchanged where w is constant."""
    h = weight.double() - 1.0
    hc = h - h.mean()
    ss = hc.pow(2).sum().item()
    if not ss > 1e-300:
        return values
    v = values.double()
    beta = ((v - v.mean()) * hc).sum().item() / ss
    return v - beta * h


def effective_draws(values: Tensor) -> float:
    """(Σ v)² / Σ v² of M per-draw values v ≥ 0: M when every draw carries the same share of
    the mean, 1 when one draw carries all of it, 0 when all are 0. Where it is small the mean
    rests on a few draws and s/√M says little about the error (a rare event the draws missed
    leaves no trace in s)."""
    v = values.double()
    total_sq = v.pow(2).sum().item()
    return v.sum().item() ** 2 / total_sq if total_sq > 0 else 0.0


@dataclass
class Moments:
    """The outer average of one σ: both forms, their combination and errors, and how many draws
    carry the value (``ess``)."""

    closed: float
    closed_stderr: float
    direct: float
    direct_stderr: float
    combined: float
    combined_stderr: float
    weight_closed: float
    m: int
    ess: float

    @classmethod
    def from_samples(cls, s: PerSample) -> Moments:
        """a* = (V_d − C)/(V_c + V_d − 2C) minimises Var(a·closed + (1−a)·direct); it is clipped
        to [0, 1], so the combination is a convex one and its mean lies between the two forms'
        (an estimated a outside [0, 1] extrapolates, and can give J* < 0). On tilted draws each
        form is first ``control_variate``-adjusted with the draws' likelihood ratios, and the
        closed form is left out (a = 0) where its rounding bound ``closed_error`` exceeds
        CLOSED_ROUNDING_SHARE of its standard error and the two forms, whose difference has
        mean 0 in exact arithmetic, differ by more than FORMS_AGREE of its standard error (the
        control removes the noise that hid the rounding: at σ = 0.3 on the two-point set,
        float32, the closed form is 1.1e-8 low against J* = 7.8e-14 with a stderr of 2.5e-15;
        the bound is a worst case, ~100× the error measured on Fashion-MNIST, so where the
        forms agree the closed form stays). ``ess`` is
        ``effective_draws`` of the direct form (as drawn, w·‖x0 − μ‖²/D)."""
        c, d = s.closed.double(), s.direct.double()
        ess = effective_draws(d)
        if s.weight is not None:
            c, d = control_variate(c, s.weight), control_variate(d, s.weight)
        m = c.numel()
        vc, vd = c.var().item(), d.var().item()
        cov = ((c - c.mean()) * (d - d.mean())).sum().item() / (m - 1)
        denom = vc + vd - 2 * cov
        a = min(1.0, max(0.0, (vd - cov) / denom)) if denom > 1e-300 else 0.5
        closed, closed_se = mean_and_stderr(c)
        direct, direct_se = mean_and_stderr(d)
        if s.closed_error > CLOSED_ROUNDING_SHARE * closed_se:
            gap, gap_se = mean_and_stderr(c - d)
            if abs(gap) > FORMS_AGREE * gap_se:
                a = 0.0  # the closed form's rounding is a bias beyond its stderr
        combined, combined_se = mean_and_stderr(a * c + (1 - a) * d)
        return cls(closed, closed_se, direct, direct_se, combined, combined_se, a, m, ess)

    def pick(self, form: str) -> tuple[float, float]:
        """(value, stderr) of ``form`` ∈ closed | direct | combined."""
        return {
            "closed": (self.closed, self.closed_stderr),
            "direct": (self.direct, self.direct_stderr),
            "combined": (self.combined, self.combined_stderr),
        }[form]


def resolve_form(form: Form, estimator: Estimator) -> Literal["closed", "direct", "combined"]:
    """``auto``: the estimator's ``capabilities.default_form``: the min-variance combination
    for the exact (and near-exact stratified) posterior and for gram (both forms unbiased); for
    the sub-sampled estimators the two forms are biased in opposite directions, so the paper's
    A − ‖μ̂‖²; forms the estimator does not report (``capabilities.forms``) are refused."""
    if form not in FORMS:
        raise ParameterError("form", form, f"expected one of {', '.join(FORMS)}")
    return cast(
        Literal["closed", "direct", "combined"],
        resolve_option("form", form, estimator, estimator.capabilities.forms),
    )


def outer_for(m: int, value: float, stderr: float, target: float) -> float:
    """M·(s/(target·J))²: the draws for a relative standard error ``target`` where M draws
    gave J ± s (s ∝ 1/√M); ∞ where J ≤ 0 (no value to be relative to)."""
    if not value > 0:
        return math.inf
    return m * (stderr / (target * value)) ** 2


def curve_point(
    sigma: float,
    samples: PerSample,
    dtype: torch.dtype,
    seconds: float,
    *,
    form: str,
    draws: str,
    process: Process | None = None,
    target: Target | None = None,
    used: tuple[int, Estimator] | None = None,
) -> CurvePoint:
    """The point at σ from its per-sample values (``Moments``; ``form``'s value, clipped at 0),
    with the process time t and the value in the target's units (J*·loss factor) where a
    process and target are given; ``used`` = (M, estimator) where adaptive sizes chose them."""
    mom = Moments.from_samples(samples)
    value, se = mom.pick(form)
    value = max(value, 0.0)  # J* is an expected squared error: a negative mean is noise
    sizes: dict[str, Any] = {}
    if used is not None:
        sizes = {
            "outer": used[0],
            "inner": cast(Any, used[1]).inner if used[1].capabilities.adapts_inner else None,
            "rse": se / value if value > 0 else None,
        }
    # tilted draws bound the closed form's rounding; not finite where σ² underflows the logits
    rounding = samples.closed_error if draws == "tilted" else None
    rounding = rounding if rounding is not None and math.isfinite(rounding) else None
    in_target = None
    if process is not None and target is not None:
        in_target = in_target_units(value, sigma, process, target)
    return CurvePoint(
        sigma=sigma,
        t=float(process.t_of_sigma_ve(sigma)) if process is not None else sigma,
        optimal_loss=value,
        stderr=se,
        optimal_loss_target=in_target,
        seconds=seconds,
        closed=mom.closed,
        closed_stderr=mom.closed_stderr,
        direct=mom.direct,
        direct_stderr=mom.direct_stderr,
        combined_weight_closed=mom.weight_closed,
        closed_rounding=rounding,
        dtype=str(dtype).removeprefix("torch."),
        ess=mom.ess,
        resolved=bool(mom.ess >= MIN_EFFECTIVE_DRAWS),  # ESS 0: no draw carries a value
        **sizes,
    )


def in_target_units(value: float, sigma: float, process: Process, target: Target) -> float:
    """A loss per element in x0 units at σ in the target's units: value·(its loss factor at
    the process time of σ)."""
    return value * float(target.loss_factor(process.t_of_sigma_ve(sigma), process))
