"""The diagnosis as a result: ``GapPoint`` (one σ: J_θ, J*, the gap and their standard errors)
and ``Diagnosis`` (a ``lossfloor.results.Result``, ``lossfloor-diagnosis``), the units and CSV
columns they write, and ``REL_FLOOR``, below which gap/J* is not given."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from lossfloor.errors import UserError
from lossfloor.results import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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
