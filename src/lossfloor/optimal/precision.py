"""The precision policy: the dtype each σ is computed in (float32, float64, or ``auto`` by
the fp32 logit error bound and the data's norms), the closed form's rounding bound, the σ range
a grid may hold, and the one overflow policy (``Overflow``): under ``auto``, values that
overflow float32 are computed again in float64; else a one-line error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import torch

from lossfloor.errors import ParameterError
from lossfloor.optimal.estimators import PerSample
from lossfloor.optimal.pools import Pool
from lossfloor.sigmas import same_sigma

Tensor = torch.Tensor
T = TypeVar("T")

#: The "auto" precision policy uses float64 where the fp32 logit error bound exceeds this. A
#: logit error δ moves J* by about δ·J* at worst; on Fashion-MNIST the measured fp32 error is
#: ~100× below the bound (docs/benchmarks.md), so 0.1 keeps J* within ~1e-3 relative.
AUTO_LOGIT_TOLERANCE = 0.1

#: The σ a grid may hold. Beyond it σ² or 1/σ² (times the data's scale) leaves float64's
#: range, and J* is the data variance (σ ≥ 1e100) or 0 (σ ≤ 1e-100) to every digit anyway.
SIGMA_RANGE = (1e-100, 1e100)

#: The "auto" policy also uses float64 for data whose centred squared norms exceed this: their
#: sums of squares come near float32's maximum (3.4e38) and lose digits or overflow.
FLOAT32_MAX_SQ_NORM = 1e30

#: The precision option, as a type (``estimate_curve``'s signature) and as a tuple.
Precision = Literal["auto", "float32", "float64"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def check_sigmas(sigmas: Sequence[float]) -> None:
    """A non-empty σ grid, each σ finite, within SIGMA_RANGE, and no σ twice (``same_sigma``):
    the one check of a grid, made before any work by ``estimate_curve`` and ``diagnose``."""
    if not sigmas:
        raise ParameterError("sigmas", list(sigmas), "the σ list is empty; give at least one σ > 0")
    lo, hi = SIGMA_RANGE
    for s in sigmas:
        if math.isnan(s):
            raise ParameterError("sigmas", s, "σ is not a number; give each σ as a number > 0")
        if not s > 0:
            raise ParameterError("sigmas", s, "every σ must be > 0")
        if not lo <= s <= hi:
            raise ParameterError(
                "sigmas", s, f"σ must lie in [{lo:g}, {hi:g}] (beyond it J* is 0 or the data "
                "variance to every digit, and σ² leaves the float range)",
            )  # fmt: skip
    twice = [s for i, s in enumerate(sigmas) if any(same_sigma(s, t) for t in sigmas[:i])]
    if twice:
        raise ParameterError("sigmas", twice[0], "this σ appears twice in the list")


def base_dtype(precision: str) -> torch.dtype:
    """The dtype a precision policy works in by default: float64 for ``float64``, else float32
    (``auto`` switches to float64 per σ where ``choose_dtype`` says so)."""
    if precision not in PRECISIONS:
        raise ParameterError("precision", precision, f"expected one of {', '.join(PRECISIONS)}")
    return torch.float64 if precision == "float64" else torch.float32


def choose_dtype(precision: str, pools: Iterable[Pool], sigma: float) -> torch.dtype:
    """float32 / float64, or ``auto``: float64 where the fp32 logit error bound at σ
    (``Pool.logit_error``: a mixture pool's own for Gaussian items) exceeds
    AUTO_LOGIT_TOLERANCE (small σ on data with large norms) or the squared norms of the data
    or of a typical query x0 + σε (R² + D·σ²) exceed FLOAT32_MAX_SQ_NORM (large data or huge
    σ), float32 elsewhere."""
    if precision != "auto":
        return base_dtype(precision)
    if max(p.max_sq + p.dim * sigma * sigma for p in pools) > FLOAT32_MAX_SQ_NORM:
        return torch.float64
    worst = max(p.logit_error(sigma, torch.float32) for p in pools)
    return torch.float64 if worst > AUTO_LOGIT_TOLERANCE else torch.float32


def closed_rounding(pool: Pool, sigma: float, dtype: torch.dtype, closed: Tensor) -> Tensor:
    """Bounds on the rounding errors of closed-form values (A − ‖μ‖²)/D computed in ``dtype``
    (``closed``, one per draw, float64): the weights' relative error δ
    (``kernel.logit_error_bound``) moves μ by e ≤ 4δ·R, and μ's own rounding by 2u·‖μ‖ (R² =
    max‖x‖², u the unit round-off), so ‖μ‖² by ≤ 2‖μ‖·e + e². Where J* is far below A·u,
    A − ‖μ‖² is a difference of nearly equal numbers and this error, systematic for a σ, is
    not in the closed form's standard error; at large σ, ‖μ‖ → 0 and so does the bound."""
    u = torch.finfo(dtype).eps / 2
    delta = pool.logit_error(sigma, dtype)
    norm = (pool.a - pool.dim * closed.double()).clamp(min=0).sqrt()  # ‖μ‖
    e = 4 * delta * math.sqrt(pool.max_sq) + 2 * u * norm
    return (2 * norm * e + e * e) / pool.dim


def finite(values: Tensor) -> bool:
    """Whether every element of ``values`` is finite."""
    return bool(values.isfinite().all())


def finite_samples(s: PerSample) -> bool:
    """Whether both forms' per-sample values are finite."""
    return bool(s.closed.isfinite().all() and s.direct.isfinite().all())


@dataclass(frozen=True)
class Overflow:
    """The one overflow policy of estimate, diagnose and floor: values computed in a dtype that
    overflow it (torch's overflow error, or a value that is not finite) are, under ``auto``
    precision in float32, computed again in float64 (σ is far from the data's scale); else a
    one-line error names σ and the dtype."""

    precision: str

    def retries(self, dtype: torch.dtype) -> bool:
        """Whether values that overflow ``dtype`` are computed again in float64."""
        return self.precision == "auto" and dtype != torch.float64

    def error(self, sigma: float, dtype: torch.dtype) -> ParameterError:
        """The refusal of σ where its values overflow ``dtype`` and are not retried."""
        hint = "" if dtype == torch.float64 else "; choose precision float64"
        return ParameterError(
            "sigmas", sigma, f"J* overflows {str(dtype).removeprefix('torch.')} at this σ for "
            f"this data's scale{hint}",
        )  # fmt: skip

    def run(
        self,
        sigma: float,
        dtype: torch.dtype,
        compute: Callable[[torch.dtype], T],
        ok: Callable[[T], bool],
    ) -> tuple[T, torch.dtype]:
        """(``compute(dtype)``, dtype) where ``ok`` of it; else (under ``retries``) the same in
        float64; else the ``error``."""
        value = _attempt(compute, dtype, ok)
        if value is None and self.retries(dtype):
            dtype = torch.float64
            value = _attempt(compute, dtype, ok)
        if value is None:
            raise self.error(sigma, dtype)
        return value, dtype


def _attempt(
    compute: Callable[[torch.dtype], T], dtype: torch.dtype, ok: Callable[[T], bool]
) -> T | None:
    """``compute(dtype)``, or None where it overflows (not ``ok``, or torch's "value cannot
    be converted to type float without overflow")."""
    try:
        value = compute(dtype)
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        return None
    return value if ok(value) else None
