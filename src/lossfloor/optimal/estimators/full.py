"""``full``: the exact posterior mean over all N points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lossfloor.errors import ParameterError
from lossfloor.optimal.capabilities import ITEMS, PLACES, Capabilities
from lossfloor.optimal.estimators.base import ESTIMATORS, Estimator
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES


@ESTIMATORS.register("full")
@dataclass(frozen=True, kw_only=True)
class Full(Estimator):
    """μ over all N points (or Gaussian items: ``mixture.py``): the exact posterior mean.
    ``inner`` and ``C`` are recorded as None (the inner set is the whole pool) and must stay
    None."""

    name: ClassVar[str] = "full"
    capabilities: ClassVar[Capabilities] = Capabilities(
        runs_on=frozenset(PLACES), default_draws="tilted", default_form="combined", exact=True,
        items=frozenset(ITEMS),
    )  # fmt: skip
    inner: None = None
    C: None = None

    def __post_init__(self) -> None:
        for param in ("inner", "C"):
            if getattr(self, param) is not None:
                raise ParameterError(
                    param, getattr(self, param), "applies to snis, dol and cdol, not to full"
                )

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "inner": None, "C": None}

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        state = pool.merge(pool.accumulate(queries, sigma, tile_bytes=tile_bytes))
        return pool.posterior(state, queries)
