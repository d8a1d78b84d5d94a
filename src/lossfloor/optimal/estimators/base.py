"""The estimators' base: ``PerSample`` (per-sample values of both forms), ``Estimator`` (the
one interface), the registry ``ESTIMATORS`` and what builds from it (``make_estimator``,
``as_estimator``) or reads it (``declared``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.capabilities import Capabilities, having, listed
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.pools import Pool
from lossfloor.registry import Registry

Tensor = torch.Tensor


@dataclass
class PerSample:
    """Per-sample values of the two forms of J*(σ), per element: closed (A − ‖μ‖²)/D and
    direct ‖x0 − μ‖²/D; on importance-sampled (tilted) draws, the likelihood ratio w of each
    draw (``draws.tilted_noise``; None on plain draws), whose known mean 1 gives a control
    variate (``moments.control_variate``), and a bound on the rounding error of the closed form's
    mean (the mean of w·``precision.closed_rounding``; 0: not checked)."""

    closed: Tensor
    direct: Tensor
    weight: Tensor | None = None
    closed_error: float = 0.0


ESTIMATORS: Registry[Estimator] = Registry("estimator")


class Estimator(ABC):
    """One interface: ``name``, ``capabilities``, ``defaults_for(n)``, ``to_config()``,
    ``posterior_mean`` and ``__call__`` → PerSample.

    ``ESTIMATORS.from_config(estimator.to_config())`` rebuilds an equal estimator.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    def defaults_for(cls, n: int) -> dict[str, Any]:
        """The parameters whose default depends on the pool size N (here: none)."""
        return {}

    @classmethod
    def for_pool(cls, n: int, **given: Any) -> Estimator:
        """This estimator for a pool of n points: ``defaults_for(n)`` under the ``given``
        parameters, checked against n (``check``)."""
        est = cls(**{**cls.defaults_for(n), **given})
        est.check(n)
        return est

    @property
    def neighbours_needed(self) -> int:
        """k of the pool's neighbour table this estimator reads (0: none)."""
        return 0

    def refusal(self, place: str) -> str | None:
        """Why this estimator, with its parameters, does not run on ``place`` (PLACES), or None
        where it does (its class's ``capabilities``)."""
        return self.capabilities.refusal(place)

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The name and parameters, as recorded in results (C = ∞ as "inf")."""

    @abstractmethod
    def posterior_mean(
        self,
        pool: Pool,
        queries: Tensor,
        sources: Tensor,
        sigma: float,
        generator: torch.Generator,
        tile_bytes: int = DEFAULT_TILE_BYTES,
    ) -> Tensor:
        """μ̂(q) for centred queries q = x_{source} + σε (B×D); ``sources`` index ``pool``."""

    def check(self, n: int) -> None:  # noqa: B027 (most estimators run on any pool)
        """Raise ParameterError if the estimator cannot run on a pool of n points."""

    def __call__(
        self,
        pool: Pool,
        sources: Tensor,
        noise: Tensor,
        sigma: float,
        generator: torch.Generator,
        tile_bytes: int = DEFAULT_TILE_BYTES,
        component: Tensor | None = None,
    ) -> PerSample:
        """Per-sample J* values for x_t = x0 + σ·noise, x0 the points ``sources`` (of Gaussian
        items: m + s⊙``component``, ``Pool.draw``)."""
        x0 = pool.draw(sources, component)
        mu = self.posterior_mean(pool, x0 + sigma * noise, sources, sigma, generator, tile_bytes)
        d = pool.dim
        closed = (pool.a - mu.double().pow(2).sum(dim=1)) / d
        direct = (x0 - mu).double().pow(2).sum(dim=1) / d
        return PerSample(closed=closed, direct=direct)


#: ``make_estimator``'s parameters and the value of each that means "not given" (the CLI's
#: defaults): only the others reach the estimator, and only if its ``capabilities.options``
#: name them.
NOT_GIVEN: dict[str, Any] = {
    "inner": None, "C": None, "replace": False, "exclude_source": None, "layout": "shared",
    "share": 256, "near": None, "fused": False,
}  # fmt: skip


def declared() -> dict[str, Capabilities]:
    """Each registered estimator's name → its ``capabilities``, in registration order."""
    return {name: ESTIMATORS.get(name).capabilities for name in ESTIMATORS.names}


def make_estimator(name: str, n: int, **params: Any) -> Estimator:
    """The estimator ``name`` for a pool of n points, through ``ESTIMATORS``: the parameters
    given (those not at their NOT_GIVEN value) over the class's ``defaults_for(n)``
    (``for_pool``). A parameter the estimator does not take (its ``capabilities.options``) is
    refused, naming those that take it; every parameter is checked (ParameterError)."""
    key = ESTIMATORS.canonical(name)
    cls = ESTIMATORS.get(key)
    given = {}
    for param, value in params.items():
        if param not in NOT_GIVEN:
            raise ParameterError(param, value, f"not a parameter of an estimator ({key})")
        if value == NOT_GIVEN[param]:
            continue
        if param not in cls.capabilities.options:
            takers = having(declared(), lambda caps, p=param: p in caps.options)
            where = f"{takers[0]} only" if len(takers) == 1 else f"{listed(takers)}, not {key}"
            raise ParameterError(param, value, f"applies to {where}")
        given[param] = value
    return cls.for_pool(n, **given)


#: What names an estimator: an instance, a name, or a config ``{"name": ..., **parameters}``.
EstimatorSpec = Estimator | str | Mapping[str, Any]


def as_estimator(spec: EstimatorSpec, n: int) -> Estimator:
    """The estimator ``spec`` names for a pool of n points: an instance as it is; a name, or a
    config whose parameters ``make_estimator`` takes, through ``make_estimator`` (the ones left
    out get their defaults for this n); any other config (a recorded ``to_config()`` with
    gram's ``rows``) through ``ESTIMATORS.from_config``."""
    if isinstance(spec, Estimator):
        return spec
    if isinstance(spec, str):
        return make_estimator(spec, n)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise UserError(f"an estimator is a name, a config with a 'name' or an Estimator: {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    if params.keys() <= _MAKE_PARAMETERS:
        return make_estimator(spec["name"], n, **params)
    return ESTIMATORS.from_config(spec)


_MAKE_PARAMETERS = set(NOT_GIVEN)
