"""Diagnosis: a model's per-σ loss against the optimal loss on the same draws (docs/method.md §4).

    gap(σ) = J_θ(σ) − J*(σ),  J_θ(σ) = E‖D_θ(x0 + σε, σ) − x0‖²/D,  J*(σ) = E‖μ(x0 + σε) − x0‖²/D

Both terms are evaluated on the same (x0, ε) draws (``lossfloor.optimal.draws``), so the gap's
standard error comes from the paired per-sample differences and is small. The draws are plain
(ε ~ N(0, I)) or tilted (``draws.tilted_noise``, the estimate's default): each draw then
carries its likelihood ratio w and every mean is the estimate's, the mean of
``moments.control_variate``(w·v, w) over the per-draw values v (J_θ, J* and their difference
alike), with its standard error. Reading a gap: below
σ* (where J* ≈ 0) the training set's optimum is the memorising denoiser, which a model that
generalises never reaches, so a gap there is partly the price of generalisation, not only
underfitting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import as_denoiser, read_protocol
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal import Curve, Full
from lossfloor.optimal.blocks import outer_blocks, per_sample_values
from lossfloor.optimal.cache import cached_per_sample, per_sample_key
from lossfloor.optimal.capabilities import having, listed
from lossfloor.optimal.draws import TILT_NEIGHBOURS, OuterPlan, block_draws
from lossfloor.optimal.estimators import PerSample, declared
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.moments import control_variate, mean_and_stderr
from lossfloor.optimal.neighbours import neighbour_tables
from lossfloor.optimal.pool_cache import PoolsByDtype
from lossfloor.optimal.precision import Overflow, check_sigmas, finite
from lossfloor.progress import progress_bar
from lossfloor.results import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]

#: The units of every diagnosis.
UNITS = "VE sigma, x0 per element; *_target in the model's target units"

#: The columns of ``Diagnosis.to_csv``: a point's JSON key and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma",
    "model_loss": "x0 units per element",
    "model_loss_stderr": "x0 units per element",
    "optimal_loss": "x0 units per element",
    "optimal_loss_stderr": "x0 units per element",
    "gap": "x0 units per element",
    "gap_stderr": "x0 units per element",
    "relative_gap": "gap / optimal_loss",
    "seconds": "s",
    "loss_factor": "target units / x0 units",
    "model_loss_target": "target units per element",
    "optimal_loss_target": "target units per element",
    "gap_target": "target units per element",
    "heldout_model_loss": "x0 units per element",
    "heldout_model_loss_stderr": "x0 units per element",
    "reading": "",
}

#: Keys of a point's JSON derived from the others (written, recomputed on reading).
DERIVED = ("relative_gap", "model_loss_target", "optimal_loss_target", "gap_target")

#: gap/J* is given (JSON, CSV, table) only where J* ≥ this × the largest J* of the diagnosis:
#: below it J* ≈ 0, the optimum memorises, and the ratio (1e7, 1e33) says nothing.
REL_FLOOR = 1e-6

#: The outer draws a diagnosis can pair on (``draws.tilted_noise`` for tilted).
DRAWS = ("plain", "tilted")


@dataclass(frozen=True, kw_only=True)
class GapPoint:
    """One σ of a diagnosis: J_θ, J* and gap = J_θ − J* (per element, x0 units; means over the
    same draws, so the gap's standard error is that of the paired differences), the seconds it
    took, and the model's loss factor (target units / x0 units) when it is a lossfloor Denoiser.
    With held-out data (``lossfloor.floor.read_heldout``): the model's held-out loss and, with a
    floor, the reading of the gap (underfitting | provable headroom | within the bracket).
    """

    sigma: float
    model_loss: float
    model_loss_stderr: float
    optimal_loss: float
    optimal_loss_stderr: float
    gap: float
    gap_stderr: float
    seconds: float
    loss_factor: float | None = None
    heldout_model_loss: float | None = None
    heldout_model_loss_stderr: float | None = None
    reading: str | None = None

    @property
    def relative_gap(self) -> float | None:
        """gap / J* (None where J* = 0)."""
        return self.gap / self.optimal_loss if self.optimal_loss > 0 else None

    @property
    def model_loss_target(self) -> float | None:
        """J_θ in the model's target units (J_θ·loss factor)."""
        return None if self.loss_factor is None else self.model_loss * self.loss_factor

    @property
    def optimal_loss_target(self) -> float | None:
        """J* in the model's target units."""
        return None if self.loss_factor is None else self.optimal_loss * self.loss_factor

    @property
    def gap_target(self) -> float | None:
        """The gap in the model's target units."""
        return None if self.loss_factor is None else self.gap * self.loss_factor

    def to_json(self, optimal_top: float = 0.0) -> dict[str, Any]:
        """The point's JSON; ``relative_gap`` is None where J* < REL_FLOOR × ``optimal_top``
        (the largest J* of its diagnosis)."""
        keep = self.optimal_loss >= REL_FLOOR * optimal_top
        out = {
            "sigma": self.sigma,
            "model_loss": self.model_loss,
            "model_loss_stderr": self.model_loss_stderr,
            "optimal_loss": self.optimal_loss,
            "optimal_loss_stderr": self.optimal_loss_stderr,
            "gap": self.gap,
            "gap_stderr": self.gap_stderr,
            "relative_gap": self.relative_gap if keep else None,
            "seconds": self.seconds,
        }
        if self.loss_factor is not None:
            out["loss_factor"] = self.loss_factor
            out["model_loss_target"] = self.model_loss_target
            out["optimal_loss_target"] = self.optimal_loss_target
            out["gap_target"] = self.gap_target
        for key in ("heldout_model_loss", "heldout_model_loss_stderr", "reading"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> GapPoint:
        if not isinstance(obj, dict):
            raise UserError(f"not a diagnosis point: {obj!r}")
        try:
            return cls(**{k: v for k, v in obj.items() if k not in DERIVED})
        except TypeError as exc:
            raise UserError(f"not a diagnosis point ({exc})") from None


@dataclass(frozen=True, kw_only=True)
class Diagnosis(Result):
    """A model's per-σ gap to the optimal loss (``diagnose``): the points, the data, the draws
    (outer M, seed), a description of the model and of the held-out data (if any).
    ``paired``: the gap's standard error is that of the paired per-sample differences; False
    when J* was read from an estimate (``optimal_from``) without its per-sample values: then it
    is the bound s.e.(J_θ) + s.e.(J*); only then the JSON has ``paired`` and ``optimal_from``.
    ``draws``: plain or tilted (then the JSON has ``draws``; files without it are plain).
    A ``Result`` ("lossfloor-diagnosis"): ``to_json`` / ``save`` write what ``lossfloor
    diagnose --out`` writes, ``from_json`` / ``load`` read it back, ``to_csv`` the points."""

    FORMAT: ClassVar[str] = "lossfloor-diagnosis"
    WHAT: ClassVar[str] = "a diagnosis"
    OMIT: ClassVar[Mapping[str, Any]] = {"model": None, "heldout": None, "draws": "plain"}
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "points": lambda ps: tuple(GapPoint.from_json(p) for p in ps)
    }
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS

    model: dict[str, Any] | None = None
    dataset: dict[str, Any]
    heldout: dict[str, Any] | None = None
    outer: int
    seed: int
    per_element: bool = True
    units: str = UNITS
    paired: bool = True
    optimal_from: str | None = None
    draws: str = "plain"
    points: tuple[GapPoint, ...]

    @property
    def largest_gap(self) -> GapPoint:
        """The point with the largest gap."""
        return max(self.points, key=lambda p: p.gap)

    @property
    def optimal_top(self) -> float:
        """The largest J* of the points (``REL_FLOOR`` is relative to it)."""
        return max(p.optimal_loss for p in self.points)

    def relative_gaps(self) -> list[float | None]:
        """gap/J* per point, None where J* < REL_FLOOR × ``optimal_top`` (J* ≈ 0)."""
        top = self.optimal_top
        return [p.to_json(top)["relative_gap"] for p in self.points]

    def gap_table(self, dataset: dict[str, Any] | None) -> dict[str, list[float]]:
        """The gap as a table {"sigma", "value"} (what a schedule takes: ``gap=``), for a curve
        of ``dataset`` (its description): refused unless its data fingerprint is this
        diagnosis' (a gap of other data would weight the wrong σ)."""
        mine = (dataset or {}).get("sha256")
        theirs = (self.dataset or {}).get("sha256")
        if mine is None or mine != theirs:
            raise UserError(
                "the gap's diagnosis was computed on another dataset than the optimal-loss "
                f"curve (sha256 {str(theirs)[:12]} vs {str(mine)[:12]}); diagnose on the "
                "curve's data"
            )
        return {"sigma": [p.sigma for p in self.points], "value": [p.gap for p in self.points]}

    def json_fields(self) -> dict[str, Any]:
        """The body: the fields but ``paired`` and ``optimal_from`` where paired (the
        default), the points with ``relative_gap`` relative to ``optimal_top``."""
        out = super().json_fields()
        if self.paired:
            del out["paired"], out["optimal_from"]
        out["points"] = [p.to_json(self.optimal_top) for p in self.points]
        return out

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """Read what ``json_fields`` writes: points, dataset, outer and seed are required."""
        if not isinstance(body.get("points"), list):
            raise UserError("not a diagnosis: expected points with sigma, model_loss, gap, …")
        missing = [k for k in ("dataset", "outer", "seed") if k not in body]
        if missing:
            raise UserError(f"not a diagnosis: no {missing[0]!r}")
        return super().from_fields(body)

    def plot(self, axes: Sequence[Axes] | None = None, title: str = "") -> list[Axes]:
        """J_θ and J* against σ on ``axes[0]``, the gap ± 2 s.e. on ``axes[1]`` (a new pyplot
        figure's without): ``plots.draw_diagnosis``. Returns the two axes."""
        from lossfloor.plots import draw_diagnosis

        return draw_diagnosis(self, axes, title)


def loss_factor_of(model: DenoiserFn, sigma: float) -> float | None:
    """The model's target-units/x0-units loss factor at σ, if it is a lossfloor Denoiser."""
    fn = getattr(model, "loss_factor", None)
    return None if fn is None else float(fn(torch.tensor(sigma, dtype=torch.float64)))


@torch.no_grad()
def model_per_sample_loss(
    model: DenoiserFn,
    dataset: Dataset,
    plan: OuterPlan,
    sigma: float,
    batch: int,
    device: torch.device,
    labels: Tensor | None,
    noise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """‖D_θ(x0 + σε, σ) − x0‖²/D for every outer draw of ``plan`` (float64), block by block
    (``blocks.outer_blocks``); ε of block j is ``noise(j)`` (default: the plain ε)."""
    out = torch.empty(plan.outer, dtype=torch.float64)
    for block in outer_blocks(plan.sources, plan.seed, dataset.dim):
        lo, hi = block.lo, block.hi
        eps = block.noise if noise is None else noise(block.index)
        for b in range(lo, hi, batch):
            e = min(hi, b + batch)
            src = plan.sources[b:e]
            x0 = dataset.x[src].to(device)
            noise_b = eps[b - lo : e - lo].reshape(x0.shape).to(device=device, dtype=x0.dtype)
            sig = torch.full((e - b,), sigma, dtype=x0.dtype, device=device)
            lab = None if labels is None else labels[src].to(device)
            pred = model(x0 + sigma * noise_b, sig, lab)
            out[b:e] = (pred.double() - x0.double()).pow(2).flatten(1).mean(1).cpu()
    return out


def split_by_range(model: DenoiserFn, sigmas: Sequence[float]) -> tuple[list[float], list[float]]:
    """(the σ of ``sigmas`` within the model's declared range [sigma_min, sigma_max] of EDM's
    protocol, ``read_protocol``; the σ outside it), each in the given order."""
    protocol = read_protocol(model)
    lo, hi = protocol.sigma_min, protocol.sigma_max
    inside = [s for s in sigmas if lo <= s <= hi]
    return inside, [s for s in sigmas if not lo <= s <= hi]


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
    (``split_by_range``) is refused. ``draws``: ``plain`` or ``tilted`` (module docstring;
    None: the ``optimal`` estimate's draws, else plain). With ``cache``, J*'s per-sample values
    are read from (or written to) ``lossfloor.optimal.cache``. With ``optimal``, an estimate of
    this data on the same draws (``optimal_from``: its file, recorded), J* is read from it
    (``optimal_from_curve``) instead of computed, the model's loss is evaluated on the
    estimate's draws (tilted: with their weights), and the gap's standard error is the bound
    s.e.(J_θ) + s.e.(J*).
    """
    check_sigmas(sigmas)
    _, outside = split_by_range(model, sigmas)
    if outside:
        protocol = read_protocol(model)
        reason = f"outside the model's range [{protocol.sigma_min:g}, {protocol.sigma_max:g}]"
        raise ParameterError("sigmas", outside[0], reason)
    _check_model_input_range(sigmas, dataset.x.dtype)
    if not batch >= 1:
        raise ParameterError("batch", batch, "must be ≥ 1")
    drawn = "plain" if optimal is None else optimal.draws or "plain"
    if draws is not None and draws != drawn and optimal is not None:
        reason = f"the estimate used {drawn} draws; the gap pairs the model with J* on them"
        raise ParameterError("draws", draws, reason)
    draws = drawn if draws is None else draws
    if draws not in DRAWS:
        raise ParameterError("draws", draws, f"expected one of {', '.join(DRAWS)}")
    device = torch.device(device)
    plan = OuterPlan.build(dataset.x, dataset.labels, outer, seed, conditional)
    labels = dataset.labels if use_labels else None
    if use_labels and labels is None:
        raise UserError("the model is class-conditional but the dataset has no labels")
    known: list[tuple[float, float, str | None] | None] = (
        [None] * len(sigmas)
        if optimal is None
        else optimal_from_curve(optimal, dataset, sigmas, outer, seed, conditional)
    )
    pools = PoolsByDtype(plan, device)
    if draws == "tilted":  # the estimate's index: k and distance dtype as estimate_curve's
        precision = "auto" if optimal is None else optimal.precision or "auto"
        index_pools = pools(pools.index_dtype(precision))
        pools.attach(neighbour_tables(plan, index_pools, TILT_NEIGHBOURS))
    todo = progress_bar(list(zip(sigmas, known, strict=True)), enabled=progress, desc="diagnose",
                unit="σ", leave=False)  # fmt: skip
    points = [
        _gap_point(model, dataset, plan, pools, s, batch, labels, cache, draws, k) for s, k in todo
    ]
    return Diagnosis(
        points=tuple(points),
        dataset={**dataset.describe(), "conditional": conditional},
        outer=outer,
        seed=seed,
        model=model_info,
        paired=optimal is None,
        optimal_from=None if optimal is None else optimal_from,
        draws=draws,
    )


def optimal_from_curve(
    curve: Curve,
    dataset: Dataset,
    sigmas: Sequence[float],
    outer: int,
    seed: int,
    conditional: bool,
) -> list[tuple[float, float, str | None]]:
    """(J*, s.e., the dtype of its draws) at each σ from an estimate on the draws a diagnosis
    uses: the curve's direct form, the mean of the same per-sample values ‖μ(x0 + σε) − x0‖²/D
    diagnose computes (tilted draws: of control_variate(w·v, w), as for the model's loss).
    Refused (parameter ``curve``) unless it is an estimate of this data (sha256, conditional)
    by the exact posterior (an estimator whose ``capabilities.exact``: ``full``), on the same
    draws (M, seed; fixed sizes, the data's own sources), with every σ."""
    info = curve.dataset or {}
    if info.get("sha256") != dataset.sha256:
        reason = "the estimate is of other data (its dataset sha256 differs from this data's)"
        raise ParameterError("curve", None, reason)
    if bool(info.get("conditional")) != conditional:
        kind = "a conditional" if conditional else "an unconditional"
        raise ParameterError("curve", None, f"the model is {kind} one; the estimate is not")
    name = (curve.estimator or {}).get("name")
    exact = having(declared(), lambda caps: caps.exact)  # per-draw values that pair: full
    if name not in exact:
        reason = f"the estimate is a {name} estimate; the gap is to the exact posterior "
        raise ParameterError("curve", None, reason + f"({listed(exact)})")
    if curve.draws not in (None, *DRAWS):
        raise ParameterError("curve", None, f"the estimate used unknown draws {curve.draws!r}")
    if curve.target_rse is not None or curve.sources is not None:
        what = "adaptive sizes (--target-rse)" if curve.sources is None else "held-out sources"
        reason = f"the estimate used {what}: its σ do not share one set of draws to pair with"
        raise ParameterError("curve", None, reason)
    if (curve.outer, curve.seed) != (outer, seed):
        reason = (
            f"the estimate holds J* on M = {curve.outer}, seed {curve.seed} draws, not M = "
            f"{outer}, seed {seed}; the gap pairs the model with J* on the same draws"
        )
        raise ParameterError("curve", None, reason)
    out = []
    for sigma in sigmas:
        point = curve.point_at(sigma)
        if point is None or point.direct is None or point.direct_stderr is None:
            grid = ", ".join(f"{s:.4g}" for s in curve.sigmas)
            raise ParameterError(
                "curve", None, f"the estimate has no J* at σ = {sigma:.6g} (its σ: {grid})"
            )
        out.append((point.direct, point.direct_stderr, point.dtype))
    return out


#: |ε| bound used for the model input's range: P(|ε| > 10) ≈ 1.5e-23 per element.
EPS_BOUND = 10.0


def _check_model_input_range(sigmas: Sequence[float], dtype: torch.dtype) -> None:
    """Refuse a σ at which the model's input x0 + σε (in the data's dtype) would overflow:
    σ·EPS_BOUND above the dtype's largest value."""
    top = torch.finfo(dtype).max
    for sigma in sigmas:
        if sigma * EPS_BOUND > top:
            name = str(dtype).removeprefix("torch.")
            raise ParameterError(
                "sigmas", sigma, f"the model's input x0 + σε overflows the data's {name} (max "
                f"{top:.3g}) at this σ; J* there is the data variance (lossfloor data)",
            )  # fmt: skip


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


def _gap_point(
    model: DenoiserFn,
    dataset: Dataset,
    plan: OuterPlan,
    pools: PoolsByDtype,
    sigma: float,
    batch: int,
    labels: Tensor | None,
    cache: bool,
    draws: str = "plain",
    known: tuple[float, float, str | None] | None = None,
) -> GapPoint:
    """J_θ(σ), J*(σ) and the gap, each a mean over the draws with its standard error (tilted:
    of control_variate(w·v, w), v the per-draw values); with ``known`` (J*, s.e., dtype of the
    draws) J* is not computed and the gap's s.e. is bounded by s.e.(J_θ) + s.e.(J*)
    (sd(a − b) ≤ sd(a) + sd(b) whatever their correlation)."""
    t0 = time.perf_counter()
    opt, drawn = None, None if known is None else known[2]
    if known is None:
        opt, dtype = optimal_per_sample_loss(plan, pools, sigma, cache, draws)
        drawn = str(dtype).removeprefix("torch.")
    noise, weight, weights = None, None, []
    if draws == "tilted":
        tables = pools(_draw_dtype(pools, sigma, drawn))

        def noise(j: int) -> Tensor:
            """Block j's tilted ε, its likelihood ratios kept in ``weights`` (each block is
            drawn once: model_per_sample_loss asks for every block once, in order)."""
            eps, w = block_draws(plan, tables, j, sigma, draws, pools.tilts)
            weights.append(w)
            return eps

    mod = model_per_sample_loss(
        as_denoiser(model), dataset, plan, sigma, batch, pools.device, labels, noise
    )  # as_denoiser refuses an output not shaped like x or not finite
    if weights:
        weight = torch.cat(weights)

    def mean(values: Tensor) -> tuple[float, float]:
        return mean_and_stderr(values if weight is None else control_variate(values, weight))

    if weight is not None:
        mod = weight * mod  # the unbiased terms, as J*'s (``per_sample_values``)
    jm, jm_se = mean(mod)
    if opt is None:
        jo, jo_se, _ = known
        gap, gap_se = jm - jo, jm_se + jo_se
    else:
        (jo, jo_se), (gap, gap_se) = mean(opt), mean(mod - opt)
    return GapPoint(
        sigma=sigma,
        model_loss=jm,
        model_loss_stderr=jm_se,
        optimal_loss=jo,
        optimal_loss_stderr=jo_se,
        gap=gap,
        gap_stderr=gap_se,
        seconds=time.perf_counter() - t0,
        loss_factor=loss_factor_of(model, sigma),
    )
