"""The results of a scaling fit (``scaling.fit.fit_scaling``): per σ (``SigmaFit``) the
log–log power laws (``PowerLawFit``, raw and subtracted) and the offset fit (``OffsetFit``),
and all of them as one result file, ``ScalingFit`` (``lossfloor-scaling-fit``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from lossfloor.errors import UserError
from lossfloor.results import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class PowerLawFit:
    """y = β·F^α fitted in log–log (y = J raw, or J − J* subtracted); ρ and residuals in
    log–log, R² of Ĵ = ŷ (+ J*) against J in linear units; ``dropped`` lists the rows with
    y ≤ 0 (J ≤ J*) as (run, F, J)."""

    alpha: float
    beta: float
    rho: float
    r2: float
    n: int
    residuals: tuple[float, ...]
    dropped: tuple[tuple[str, float, float], ...] = ()

    def to_json(self, with_dropped: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alpha": self.alpha,
            "beta": self.beta,
            "rho": self.rho,
            "r2": self.r2,
            "n": self.n,
            "residuals": list(self.residuals),
        }
        if with_dropped:
            out["dropped_rows"] = len(self.dropped)
            out["dropped"] = [{"run": r, "x": x, "loss": j} for r, x, j in self.dropped]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PowerLawFit:
        """Read what ``to_json`` writes (``dropped_rows`` is derived)."""
        dropped = tuple((d["run"], d["x"], d["loss"]) for d in obj.get("dropped", ()))
        keys = ("alpha", "beta", "rho", "r2", "n")
        return cls(**{k: obj[k] for k in keys}, residuals=tuple(obj["residuals"]), dropped=dropped)


@dataclass(frozen=True)
class OffsetFit:
    """J = β·F^α + c with c free; standard errors from curve_fit's covariance (None where it
    is singular); ``c_minus_optimal`` = c − J*."""

    alpha: float
    beta: float
    c: float
    alpha_stderr: float | None
    beta_stderr: float | None
    c_stderr: float | None
    c_minus_optimal: float
    r2: float

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "c": self.c,
            "c_stderr": self.c_stderr,
            "alpha_stderr": self.alpha_stderr,
            "beta_stderr": self.beta_stderr,
            "c_minus_optimal": self.c_minus_optimal,
            "r2": self.r2,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> OffsetFit:
        return cls(**obj)


@dataclass(frozen=True)
class SigmaFit:
    """The three fits at one σ (None: the total loss) against J* = ``optimal_loss``, on ``n``
    rows; ``x`` and ``loss`` are those rows (for plots: a fit read from its JSON has none)."""

    sigma: float | None
    optimal_loss: float
    n: int
    raw: PowerLawFit
    subtracted: PowerLawFit
    offset: OffsetFit | None
    x: tuple[float, ...] = ()
    loss: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "optimal_loss": self.optimal_loss,
            "n": self.n,
            "raw": self.raw.to_json(with_dropped=False),
            "subtracted": self.subtracted.to_json(with_dropped=True),
            "offset": None if self.offset is None else self.offset.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SigmaFit:
        """Read what ``to_json`` writes (without the rows ``x``, ``loss``)."""
        offset = obj["offset"]
        return cls(
            sigma=obj["sigma"],
            optimal_loss=obj["optimal_loss"],
            n=obj["n"],
            raw=PowerLawFit.from_json(obj["raw"]),
            subtracted=PowerLawFit.from_json(obj["subtracted"]),
            offset=None if offset is None else OffsetFit.from_json(offset),
        )

    def row(self) -> dict[str, Any]:
        """The fit as one flat row (``ScalingFit.to_csv``): sigma, optimal_loss, n, then each
        fit's numbers prefixed by its name (raw_alpha, subtracted_dropped_rows, …)."""
        obj = self.to_json()
        out = {k: obj[k] for k in ("sigma", "optimal_loss", "n")}
        for name in ("raw", "subtracted", "offset"):
            numbers = (obj[name] or {}).items()
            out.update({f"{name}_{k}": v for k, v in numbers if k not in ("residuals", "dropped")})
        return out


#: The columns of ``ScalingFit.to_csv``: a fit's row key and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma (empty: the total loss)",
    "optimal_loss": "x0 units per element",
    "n": "rows",
    **{f"{fit}_{k}": unit for fit in ("raw", "subtracted") for k, unit in (
        ("alpha", "dimensionless"), ("beta", "x0 units per element / F^alpha"),
        ("rho", "dimensionless"), ("r2", "dimensionless"))},
    "subtracted_dropped_rows": "rows",
    **{f"offset_{k}": unit for k, unit in (
        ("alpha", "dimensionless"), ("beta", "x0 units per element / F^alpha"),
        ("c", "x0 units per element"), ("c_stderr", "x0 units per element"),
        ("alpha_stderr", "dimensionless"), ("beta_stderr", "x0 units per element / F^alpha"),
        ("c_minus_optimal", "x0 units per element"), ("r2", "dimensionless"))},
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ScalingFit(Result):
    """All fits of a RUNS.csv against F = ``x`` (``fit_scaling``). A ``Result``
    ("lossfloor-scaling-fit"): ``save`` writes what ``lossfloor scaling fit --out`` writes,
    ``load`` reads it back (the fits without their rows), ``to_csv`` one row per fit."""

    FORMAT: ClassVar[str] = "lossfloor-scaling-fit"
    WHAT: ClassVar[str] = "a scaling fit"
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "fits": lambda fs: tuple(SigmaFit.from_json(f) for f in fs)
    }
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS

    x: str
    fits: tuple[SigmaFit, ...]

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """Read what ``json_fields`` writes: x and fits are required."""
        if not isinstance(body.get("fits"), list) or "x" not in body:
            raise UserError("not a scaling fit: expected x and fits")
        try:
            return super().from_fields(body)
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a scaling fit: no {exc}") from None

    def rows(self) -> list[dict[str, Any]]:
        """One row per fit (``SigmaFit.row``)."""
        return [f.row() for f in self.fits]

    def plot(self, axes: Sequence[Axes] | None = None) -> list[Axes]:
        """One panel per fit on ``axes`` (a new pyplot figure's without): J against F, both
        fits, J*: ``plots.draw_scaling``. Returns the axes. Needs the rows: a fit computed by
        ``fit_scaling``, not one read from its JSON."""
        from lossfloor.plots import draw_scaling

        if any(not f.x for f in self.fits):
            raise UserError("a scaling fit read from its JSON has no rows to plot; fit the runs")
        return draw_scaling(self, axes)
