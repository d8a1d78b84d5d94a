"""The floor's result: ``SizePoint`` (J* of n-subsets), ``FloorPoint`` (the bracket and verdict
at σ) and ``Floor`` (a ``results.Result``, ``lossfloor-floor``, with a CSV of the bracket)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self

from lossfloor.errors import UserError
from lossfloor.floor.heldout import HeldoutPoint
from lossfloor.results import Result
from lossfloor.sigmas import same_sigma

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: The tag of the key of ``floor``'s checkpoint, and of floor files written before the shared
#: result header (``Floor.LEGACY_FORMAT``).
FORMAT = "lossfloor-floor/1"

#: The columns of ``Floor.to_csv``: a point's key and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma",
    "lower": "x0 units per element",
    "lower_stderr": "x0 units per element",
    "upper": "x0 units per element",
    "upper_stderr": "x0 units per element",
    "upper_source": "",
    "converged": "",
    "verdict": "",
    "rise": "x0 units per element",
    "rise_stderr": "x0 units per element",
    "extrapolated": "x0 units per element",
    "extrapolated_stderr": "x0 units per element",
    "crossing": "",
    "heldout_loss": "x0 units per element",
    "heldout_stderr": "x0 units per element",
    "smoothed_loss": "x0 units per element",
    "smoothed_stderr": "x0 units per element",
    "bandwidth": "x0 units",
}


@dataclass(frozen=True, kw_only=True)
class SizePoint:
    """J* at σ of random n-subsets: the mean over ``repeats`` subsets and its standard error
    (the spread over subsets/√repeats combined with the draws' own errors)."""

    n: int
    optimal_loss: float
    stderr: float
    repeats: int


@dataclass(frozen=True, kw_only=True)
class FloorPoint:
    """The floor at σ: ``lower`` = J*_train(N) (± ``lower_stderr``), ``upper`` = the least
    held-out bound (± ``upper_stderr``, from ``upper_source``), the verdict (``size_verdict``:
    converged, memorised, rising or undecided) and the N-trend's extrapolation J*_∞ (± its
    error), clipped to [lower, upper]; ``crossing`` flags lower > upper."""

    sigma: float
    lower: float
    lower_stderr: float
    upper: float
    upper_stderr: float
    upper_source: str
    converged: bool
    verdict: str
    rise: float
    rise_stderr: float
    extrapolated: float
    extrapolated_stderr: float
    heldout: HeldoutPoint
    by_n: list[SizePoint]

    @property
    def crossing(self) -> str | None:
        """None where lower ≤ upper; else "within error" where lower − upper ≤ 2·√(se_l² +
        se_u²) (noise: both bound J*_pop only in expectation), "beyond error" otherwise (a real
        inconsistency: e.g. the held-out set is not drawn like the training set)."""
        if self.lower <= self.upper:
            return None
        within = self.lower - self.upper <= 2 * math.hypot(self.lower_stderr, self.upper_stderr)
        return "within error" if within else "beyond error"

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["heldout"] = self.heldout.to_json()
        out["by_n"] = [dataclasses.asdict(s) for s in self.by_n]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FloorPoint:
        return cls(
            **{
                **obj,
                "heldout": HeldoutPoint(**obj["heldout"]),
                "by_n": [SizePoint(**s) for s in obj["by_n"]],
            }
        )


@dataclass(frozen=True, kw_only=True)
class Floor(Result):
    """The floor over a σ grid (``floor``): points, both datasets and the parameters. A
    ``Result`` ("lossfloor-floor"; files tagged FORMAT, before the shared header, are read
    too): ``save`` writes what ``lossfloor floor --out`` writes, ``to_csv`` the per-σ
    bracket and verdict."""

    LEGACY_FORMAT: ClassVar[str | None] = FORMAT  # the module's (read before it is shadowed)
    FORMAT: ClassVar[str] = "lossfloor-floor"
    WHAT: ClassVar[str] = "a floor"
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "points": lambda ps: [FloorPoint.from_json(p) for p in ps]
    }
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS

    dataset: dict[str, Any]
    heldout: dict[str, Any]
    data_variance: float
    params: dict[str, Any]
    points: list[FloorPoint]

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """Read what ``json_fields`` writes; every field is required."""
        names = ("points", "dataset", "heldout", "data_variance", "params")
        missing = [f for f in names if f not in body]
        if missing:
            raise UserError(f"not a floor file: no {missing[0]!r}")
        try:
            return super().from_fields(body)
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a floor file: {exc}") from None

    def rows(self) -> list[dict[str, Any]]:
        """The per-σ table: each point's bracket, verdict, extrapolation and ``crossing``, and
        its held-out losses (``HeldoutPoint``)."""
        return [{**p.to_json(), **p.heldout.to_json(), "crossing": p.crossing} for p in self.points]

    def plot(self, axes: Sequence[Axes] | None = None, title: str = "") -> list[Axes]:
        """The bracket, J* by subset size and the extrapolation on ``axes[0]``, the N-trend on
        ``axes[1]`` (a new pyplot figure's without): ``plots.draw_floor``. Returns the axes."""
        from lossfloor.plots import draw_floor

        return draw_floor(self, axes, title)

    def at(self, sigma: float) -> FloorPoint | None:
        """The point at σ (``same_sigma``), or None."""
        return next((p for p in self.points if same_sigma(p.sigma, sigma)), None)
