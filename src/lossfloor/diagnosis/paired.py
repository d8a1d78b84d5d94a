"""The paired gap: J*'s per-sample values ‖μ(x0 + σε) − x0‖²/D on the draws the model's loss is
evaluated on, the gap per σ (``GapPoint``) and ``diagnose``, which runs it over a grid of σ."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lossfloor.data import Dataset
from lossfloor.diagnosis.from_curve import Known, optimal_from_curve
from lossfloor.diagnosis.model import (
    DenoiserFn,
    check_model_sigmas,
    loss_factor_of,
    model_per_sample_loss,
)
from lossfloor.diagnosis.result import DRAWS, Diagnosis, GapPoint
from lossfloor.diffusion.denoiser import as_denoiser
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal import Curve, Full
from lossfloor.optimal.blocks import per_sample_values
from lossfloor.optimal.cache import cached_per_sample, per_sample_key
from lossfloor.optimal.draws import TILT_NEIGHBOURS, OuterPlan, block_draws
from lossfloor.optimal.estimators import PerSample
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.mixture import GAUSSIAN_TEXT
from lossfloor.optimal.moments import control_variate, mean_and_stderr
from lossfloor.optimal.neighbours import neighbour_tables
from lossfloor.optimal.pool_cache import PoolsByDtype
from lossfloor.optimal.precision import Overflow, check_sigmas, finite
from lossfloor.progress import progress_bar

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pairing:
    """What every σ of a diagnosis shares: the model, the data and its outer draws (``plan``,
    their pools, ``draws`` plain or tilted), the model's batch size and labels (None: an
    unconditional model), and whether J*'s per-sample values go through the cache."""

    model: DenoiserFn
    dataset: Dataset
    plan: OuterPlan
    pools: PoolsByDtype
    batch: int
    labels: Tensor | None
    cache: bool
    draws: str


def diagnose(
    model: DenoiserFn,
    dataset: Dataset,
    sigmas: Sequence[float],
    *,
    outer: int = 2048,
    seed: int = 0,
    batch: int = 256,
    conditional: bool = False,
    use_labels: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    cache: bool = True,
    optimal: Curve | None = None,
    optimal_from: str | None = None,
    draws: str | None = None,
) -> Diagnosis:
    """Per σ: model loss, optimal loss, the paired gap and its standard error (per element, x0
    units; also in the model's target units when it is a lossfloor Denoiser). ``model_info``
    is recorded as the diagnosis' ``model``. σ outside the model's declared range
    (``split_by_range``) is refused. ``draws``: ``plain`` or ``tilted`` (``lossfloor.diagnosis``;
    None: the ``optimal`` estimate's draws, else plain). With ``cache``, J*'s per-sample values
    are read from (or written to) ``lossfloor.optimal.cache``. With ``optimal``, an estimate of
    this data on the same draws (``optimal_from``: its file, recorded), J* is read from it
    (``optimal_from_curve``) instead of computed, the model's loss is evaluated on the
    estimate's draws (tilted: with their weights), and the gap's standard error is the bound
    s.e.(J_θ) + s.e.(J*). Of Gaussian items (``Dataset.std``), each draw's x0 = m + s⊙z is
    the estimate's (z of ``Stream.COMPONENT``), so J_θ and J* of the mixture pair; plain draws.
    """
    check_sigmas(sigmas)
    check_model_sigmas(model, sigmas, dataset.x.dtype)
    if not batch >= 1:
        raise ParameterError("batch", batch, "must be ≥ 1")
    draws = _resolve_draws(draws, optimal)
    if dataset.std is not None and draws != "plain":
        raise ParameterError("draws", draws, f"{GAUSSIAN_TEXT} take plain draws")
    device = torch.device(device)
    plan = OuterPlan.build(dataset.x, dataset.labels, outer, seed, conditional, dataset.std)
    labels = dataset.labels if use_labels else None
    if use_labels and labels is None:
        raise UserError("the model is class-conditional but the dataset has no labels")
    known: Sequence[Known | None] = (
        [None] * len(sigmas)
        if optimal is None
        else optimal_from_curve(optimal, dataset, sigmas, outer, seed, conditional)
    )
    pools = _pools(plan, device, draws, optimal)
    pair = Pairing(model, dataset, plan, pools, batch, labels, cache, draws)
    todo = progress_bar(list(zip(sigmas, known, strict=True)), enabled=progress, desc="diagnose",
                unit="σ", leave=False)  # fmt: skip
    return Diagnosis(
        points=tuple(_gap_point(pair, s, k) for s, k in todo),
        dataset={**dataset.describe(), "conditional": conditional},
        outer=outer,
        seed=seed,
        model=model_info,
        paired=optimal is None,
        optimal_from=None if optimal is None else optimal_from,
        draws=draws,
    )


def _resolve_draws(draws: str | None, optimal: Curve | None) -> str:
    """The draws a diagnosis pairs on: ``draws``, else the ``optimal`` estimate's (plain
    without); refused unless plain or tilted, or where they are not the estimate's."""
    drawn = "plain" if optimal is None else optimal.draws or "plain"
    if draws is not None and draws != drawn and optimal is not None:
        reason = f"the estimate used {drawn} draws; the gap pairs the model with J* on them"
        raise ParameterError("draws", draws, reason)
    draws = drawn if draws is None else draws
    if draws not in DRAWS:
        raise ParameterError("draws", draws, f"expected one of {', '.join(DRAWS)}")
    return draws


def _pools(
    plan: OuterPlan, device: torch.device, draws: str, optimal: Curve | None
) -> PoolsByDtype:
    """The pools of ``plan`` on ``device``; for tilted draws with the estimate's neighbour
    index (k and distance dtype as ``estimate_curve``'s, by the ``optimal`` estimate's
    precision or ``auto``)."""
    pools = PoolsByDtype(plan, device)
    if draws == "tilted":
        precision = "auto" if optimal is None else optimal.precision or "auto"
        index_pools = pools(pools.index_dtype(precision))
        pools.attach(neighbour_tables(plan, index_pools, TILT_NEIGHBOURS))
    return pools


def optimal_per_sample_loss(
    plan: OuterPlan, pools: PoolsByDtype, sigma: float, cache: bool = True, draws: str = "plain"
) -> tuple[Tensor, torch.dtype]:
    """‖μ(x0 + σε) − x0‖²/D for every outer draw of ``plan`` (the exact posterior mean, dtype
    by the ``auto`` policy, float64 where float32 overflows: ``precision.Overflow``; float64)
    and the dtype they were computed in, from the cache when ``cache`` and it holds them; on
    ``tilted`` draws (the pools need their neighbour tables) w·‖μ − x0‖²/D, w the draw's
    likelihood ratio."""
    estimator = Full()

    def compute(dtype: torch.dtype) -> Tensor:
        def values() -> PerSample:
            return per_sample_values(plan, estimator, sigma, dtype, pools.device, pools(dtype),
                                     draws=draws, tilt_cache=pools.tilts)  # fmt: skip

        if not cache:
            return values().direct
        key = per_sample_key(plan, estimator, sigma, dtype, pools.device, DEFAULT_TILE_BYTES)
        if draws != "plain":  # plain keys as before, so their files stay valid
            key["draws"] = draws
        return cached_per_sample(key, plan.outer, values).direct

    return Overflow("auto").run(sigma, pools.dtype_at("auto", sigma), compute, finite)


def _draw_dtype(pools: PoolsByDtype, sigma: float, saved: str | None) -> torch.dtype:
    """The dtype whose pools drew the tilted ε at σ: J*'s (``saved``: computed here, or the
    estimate's), else the ``auto`` policy's (an estimate that did not record it)."""
    named = {"float32": torch.float32, "float64": torch.float64}
    return named[saved] if saved in named else pools.dtype_at("auto", sigma)


def _model_values(pair: Pairing, sigma: float, drawn: str | None) -> tuple[Tensor, Tensor | None]:
    """The model's per-draw loss ‖D_θ(x0 + σε, σ) − x0‖²/D on the pairing's draws and, tilted,
    the draws' likelihood ratios w, the loss then w·‖D_θ − x0‖²/D (the unbiased terms, as J*'s
    in ``per_sample_values``); ``drawn``: the dtype whose pools drew the tilted ε."""
    noise: Callable[[int], Tensor] | None = None
    weights: list[Tensor] = []
    if pair.draws == "tilted":
        tables = pair.pools(_draw_dtype(pair.pools, sigma, drawn))

        def tilted(j: int) -> Tensor:
            """Block j's tilted ε, its likelihood ratios kept in ``weights`` (each block is
            drawn once: model_per_sample_loss asks for every block once, in order)."""
            eps, w = block_draws(pair.plan, tables, j, sigma, pair.draws, pair.pools.tilts)
            if w is not None:  # always, on tilted draws
                weights.append(w)
            return eps

        noise = tilted
    mod = model_per_sample_loss(as_denoiser(pair.model), pair.dataset, pair.plan, sigma,
                                pair.batch, pair.pools.device, pair.labels, noise)  # fmt: skip
    # as_denoiser refuses an output not shaped like x or not finite
    if not weights:
        return mod, None
    weight = torch.cat(weights)
    return weight * mod, weight


def _mean(values: Tensor, weight: Tensor | None) -> tuple[float, float]:
    """The mean of per-draw values and its standard error (tilted, with ``weight`` w: of
    control_variate(values, w))."""
    return mean_and_stderr(values if weight is None else control_variate(values, weight))


def _gap_point(pair: Pairing, sigma: float, known: Known | None = None) -> GapPoint:
    """J_θ(σ), J*(σ) and the gap, each a mean over the draws with its standard error (tilted:
    of control_variate(w·v, w), v the per-draw values); with ``known`` (J*, s.e., dtype of the
    draws) J* is not computed and the gap's s.e. is bounded by s.e.(J_θ) + s.e.(J*)
    (sd(a − b) ≤ sd(a) + sd(b) whatever their correlation)."""
    t0 = time.perf_counter()
    optimal: Tensor | Known
    drawn: str | None
    if known is None:
        optimal, dtype = optimal_per_sample_loss(pair.plan, pair.pools, sigma, pair.cache,
                                                 pair.draws)  # fmt: skip
        drawn = str(dtype).removeprefix("torch.")
    else:
        optimal, drawn = known, known[2]
    mod, weight = _model_values(pair, sigma, drawn)
    jm, jm_se = _mean(mod, weight)
    if isinstance(optimal, Tensor):
        (jo, jo_se), (gap, gap_se) = _mean(optimal, weight), _mean(mod - optimal, weight)
    else:
        jo, jo_se, _ = optimal
        gap, gap_se = jm - jo, jm_se + jo_se
    return GapPoint(
        sigma=sigma,
        model_loss=jm,
        model_loss_stderr=jm_se,
        optimal_loss=jo,
        optimal_loss_stderr=jo_se,
        gap=gap,
        gap_stderr=gap_se,
        seconds=time.perf_counter() - t0,
        loss_factor=loss_factor_of(pair.model, sigma),
    )
