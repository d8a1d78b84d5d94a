"""Adaptive sizes: per σ, the outer draws (and the stratified estimator's far sample) for a
target relative standard error, from a pilot on the first draws of a larger plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import torch

from lossfloor.errors import ParameterError
from lossfloor.optimal.draws import OUTER_BLOCK, OuterPlan, check_outer, join_samples
from lossfloor.optimal.estimators import Estimator, PerSample
from lossfloor.optimal.moments import Moments, outer_for


class Values(Protocol):
    """The per-sample values at one σ of ``estimator`` on the first m draws of a plan, in a
    dtype, from block ``first_block`` on; and the dtype they came out in (the overflow policy
    may have switched to float64)."""

    def __call__(
        self, estimator: Estimator, m: int, dtype: torch.dtype, first_block: int = 0
    ) -> tuple[PerSample, torch.dtype]: ...


#: Adaptive sizes: the default pilot (draws), the default plan (× the pilot), and the share of
#: the target error the stratified estimator's far-sample bias may take.
ADAPTIVE_PILOT = 4 * OUTER_BLOCK
ADAPTIVE_CAP = 64
ADAPTIVE_BIAS_SHARE = 0.5


def adaptive_sizes(
    target_rse: float | None, max_outer: int | None, outer: int | None
) -> tuple[float, int, int] | None:
    """(target, pilot, plan size) of adaptive sizes, checked; None without a target. The pilot
    is ``outer`` (default ADAPTIVE_PILOT) rounded up to whole blocks of OUTER_BLOCK."""
    if target_rse is None:
        if max_outer is not None:
            raise ParameterError("max_outer", max_outer, "applies to adaptive sizes: give a target")
        return None
    if not (isinstance(target_rse, int | float) and 0 < target_rse < 1):
        raise ParameterError("target_rse", target_rse, "a relative standard error in (0, 1)")
    pilot = ADAPTIVE_PILOT if outer is None else outer
    check_outer(pilot)
    pilot = math.ceil(pilot / OUTER_BLOCK) * OUTER_BLOCK
    cap = ADAPTIVE_CAP * pilot if max_outer is None else max_outer
    check_outer(cap)
    if cap < pilot:
        raise ParameterError(
            "max_outer", cap, f"below the pilot's {pilot} draws (whole blocks of {OUTER_BLOCK})"
        )
    return float(target_rse), min(pilot, cap), cap


def adaptive_values(
    run: Values,
    plan: OuterPlan,
    estimator: Estimator,
    form: str,
    dtype: torch.dtype,
    target: float,
    pilot: int,
) -> tuple[PerSample, torch.dtype, tuple[int, Estimator]]:
    """Per-sample values at one σ with sizes chosen for a relative standard error ``target``:

    1. a pilot on the first ``pilot`` draws gives J₀ ± s₀;
    2. stratified: the far sample L from the ratio-estimator bias b/L (O(1/L), the
       ``Stratified`` docstring): the pilot at L' = min(2L, N) on the same draws gives
       b = (J_L − J_L')/(1/L − 1/L'), and L grows to |b|/(share·target·J_L') so the bias b/L
       is at most share = ADAPTIVE_BIAS_SHARE of the target (the pilot is rerun at the chosen
       L if it is neither L nor L');
    3. M = M₀·(s₀/(target·J₀))² (s ∝ 1/√M: ``moments.outer_for``), in whole blocks,
       within [pilot, the M of ``plan``]; the pilot's draws are the first M's (they are not
       drawn again).

    The reported stderr is that of the M draws, so the achieved relative error is measured, not
    assumed; it misses the target where M reaches the plan's size."""
    first, dtype = run(estimator, pilot, dtype)
    value, se = Moments.from_samples(first).pick(form)
    est = estimator
    n = min(members.numel() for members, _ in plan.groups)
    ratio: Any = estimator  # adapts_inner: a dataclass with a far sample ``inner`` (Stratified)
    if estimator.capabilities.adapts_inner and ratio.inner < n:
        big = ratio.inner
        wider = dataclasses.replace(ratio, inner=min(n, 2 * big))
        second, dtype = run(wider, pilot, dtype)
        value2, se2 = Moments.from_samples(second).pick(form)
        slope = (value - value2) / (1 / big - 1 / wider.inner)  # b in J_L = J + b/L
        want = abs(slope) / (ADAPTIVE_BIAS_SHARE * target * value2) if value2 > 0 else n
        if want > big:
            size = min(n, math.ceil(want))
            if size <= wider.inner:
                est, first, value, se = wider, second, value2, se2
            else:
                est = dataclasses.replace(ratio, inner=size)
                first, dtype = run(est, pilot, dtype)
                value, se = Moments.from_samples(first).pick(form)
    m = adaptive_outer(plan, pilot, value, se, target)
    if m > pilot:
        rest, wider_dtype = run(est, m, dtype, pilot // OUTER_BLOCK)
        if wider_dtype != dtype:  # the rest overflowed float32: all of it in float64
            first, dtype = run(est, m, wider_dtype)
        else:
            first = join_samples(first, rest)
    return first, dtype, (m, est)


def adaptive_outer(plan: OuterPlan, pilot: int, value: float, se: float, target: float) -> int:
    """Step 3 of ``adaptive_values``: M = M₀·(s₀/(target·J₀))² (``moments.outer_for``) from
    the pilot's J₀ ± s₀, in whole blocks, within [pilot, the M of ``plan``]."""
    need = outer_for(pilot, value, se, target)
    blocks = math.ceil(need / OUTER_BLOCK) if math.isfinite(need) else plan.blocks
    return min(plan.outer, max(pilot, blocks * OUTER_BLOCK))
