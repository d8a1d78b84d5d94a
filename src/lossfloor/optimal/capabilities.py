"""What an estimator can do, declared on its class (``Estimator.capabilities``): where it runs,
which draws and forms it takes and defaults to, what it needs and what it computes. The
resolution of defaults (``resolve_option``: ``draws.resolve_draws``, ``moments.resolve_form``),
every refusal (``shard.check_sharded``, ``make_estimator``'s parameters, a diagnosis's curve)
and the CLI's help read these declarations; a new estimator is one class with its
``Capabilities``.

No torch here: the declarations are plain data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lossfloor.errors import ParameterError

if TYPE_CHECKING:
    from lossfloor.optimal.estimators import Estimator

#: Where an estimator runs: one pool held in memory, a pool sharded over processes
#: (``shard.ShardedPool``), a pool read per chunk (``stream.StreamedPool``).
PLACES = ("memory", "sharded", "streamed")
#: What each place means in a refusal.
PLACE_TEXT = {
    "memory": "data in memory",
    "sharded": "several processes",
    "streamed": "streamed data (--stream)",
}
#: The kinds of items an estimator may range over: points, or Gaussians N(m_i, diag s_i²)
#: (``mixture.MixturePool``: VAE latents with a std).
ITEMS = ("points", "gaussian")
ITEM_TEXT = {"points": "points", "gaussian": "Gaussian items (VAE latents with a std)"}
ALL_DRAWS = frozenset({"plain", "tilted"})
ALL_FORMS = frozenset({"closed", "direct", "combined"})


@dataclass(frozen=True)
class Capabilities:
    """An estimator's declaration.

    - ``runs_on``: the places (PLACES) it runs on; ``why_not[place]`` says, for each other
      place, why not (e.g. the ``Pool`` method the estimator needs that such a pool lacks).
    - ``draws`` / ``default_draws``: the outer draws it takes (plain, tilted) and ``auto``'s.
    - ``forms`` / ``default_form``: the forms of J* it reports (closed, direct, combined) and
      ``auto``'s.
    - ``options``: the parameters of ``make_estimator`` it takes (others are refused).
    - ``needs_neighbours``: it reads the pool's neighbour table (``neighbours_needed`` > 0).
    - ``sweeps_grid``: it computes a whole σ grid in one sweep (``grid_values``): in memory in
      one process with any draws, pools and sizes; sharded or streamed on plain draws at fixed
      sizes (``sweep.sweeps``).
    - ``adapts_inner``: adaptive sizes (``target_rse``) also choose its ``inner`` (a ratio
      estimator's bias ∝ 1/L).
    - ``exact``: its per-draw values are those of the exact posterior, so a model's loss on
      the same draws pairs with them (a diagnosis reads such an estimate).
    - ``items``: the kinds of items (ITEMS) it ranges over; ``why_not[kind]`` says, for each
      other kind, why not.
    """

    runs_on: frozenset[str]
    default_draws: str
    default_form: str
    options: frozenset[str] = frozenset()
    draws: frozenset[str] = ALL_DRAWS
    forms: frozenset[str] = ALL_FORMS
    needs_neighbours: bool = False
    sweeps_grid: bool = False
    adapts_inner: bool = False
    exact: bool = False
    items: frozenset[str] = frozenset({"points"})
    why_not: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = (self.runs_on - set(PLACES)) | (self.items - set(ITEMS))
        able = self.runs_on | self.items
        missing = [p for p in PLACES + ITEMS if p not in able and p not in self.why_not]
        if unknown or missing:
            raise ValueError(
                f"places or items {sorted(unknown)} unknown, {missing} without a reason"
            )
        if self.default_draws not in self.draws or self.default_form not in self.forms:
            raise ValueError("a default draws or form that the estimator does not take")

    def refusal(self, place: str) -> str | None:
        """Why the estimator does not run on ``place`` (a place or a kind of items), or None
        where it does."""
        return None if place in self.runs_on or place in self.items else self.why_not[place]


def listed(names: Iterable[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def having(declared: Mapping[str, Capabilities], test) -> list[str]:
    """The names of ``declared`` (name → Capabilities, in order) whose declaration passes
    ``test``."""
    return [name for name, caps in declared.items() if test(caps)]


def resolve_option(param: str, value: str, estimator: Estimator, able: frozenset[str]) -> str:
    """``value``, or the ``estimator``'s default ``param`` (draws or form) for ``auto``;
    refused where ``able`` lacks it."""
    caps = estimator.capabilities
    if value == "auto":
        return caps.default_draws if param == "draws" else caps.default_form
    if value not in able:
        reason = (
            f"the {estimator.name} estimator does not take it ({param}: {listed(sorted(able))})"
        )
        raise ParameterError(param, value, reason)
    return value
