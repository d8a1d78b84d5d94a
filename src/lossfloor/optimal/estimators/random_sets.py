"""Estimators over a random inner set R: ``snis``, ``dol`` and ``cdol`` (a ``Subset`` each),
and ``resolve_C``, the correction C of cDOL from a number or a rule."""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lossfloor.errors import ParameterError
from lossfloor.optimal.capabilities import PLACES, Capabilities
from lossfloor.optimal.estimators.base import ESTIMATORS, Estimator
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES, SoftmaxState

Tensor = torch.Tensor


@dataclass(frozen=True, kw_only=True)
class Subset(Estimator):
    """μ over a random set R (and, for DOL / cDOL, the source, weighted 1/C): the base of
    ``SNIS`` (C = None), ``DOL`` (C = 1) and ``CDOL`` (any C > 0, ∞ allowed).

    ``inner`` is L, the total inner size: R has L points for SNIS and L−1 with a source term.
    Both layouts run on every pool: the shared one through ``Pool.accumulate``, the
    independent one through ``Pool.rows`` (each query's own random rows, gathered by index).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        runs_on=frozenset(PLACES),
        default_draws="plain",
        default_form="closed",
        options=frozenset({"inner", "C", "replace", "exclude_source", "layout", "share"}),
        why_not={
            "gaussian": "its random inner sets and source term weigh points by the point "
            "kernel's logits (Pool.rows), not by a component's per-σ keys; full is exact on them"
        },
    )

    inner: int
    C: float | None = None
    replace: bool = False
    exclude_source: bool = True
    layout: str = "shared"
    share: int | None = 256

    def __post_init__(self) -> None:
        if not self.inner >= 2:
            raise ParameterError("inner", self.inner, "the inner set needs at least 2 points")
        if self.layout not in ("shared", "independent"):
            raise ParameterError("layout", self.layout, "expected shared or independent")
        if self.layout == "independent":
            object.__setattr__(self, "share", None)  # each query has its own set: no sharing
        elif not (self.share is not None and self.share >= 1):
            raise ParameterError("share", self.share, "must be ≥ 1")
        self._check_C()

    @abstractmethod
    def _check_C(self) -> None:
        """Raise ParameterError unless C is what this estimator allows; store it as a float."""

    @property
    def n_random(self) -> int:
        """|R|: L for SNIS, L−1 beside the source for DOL/cDOL."""
        return self.inner if self.C is None else self.inner - 1

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner": self.inner,
            "C": self.C if self.C is None or math.isfinite(self.C) else "inf",
            "replace": self.replace,
            "exclude_source": self.exclude_source,
            "layout": self.layout,
            "share": self.share,
        }

    @classmethod
    def defaults_for(cls, n: int) -> dict[str, Any]:
        """L = max(2, N/10)."""
        return {"inner": max(2, min(n, n // 10))}

    def check(self, n: int) -> None:
        if self.inner > n:
            raise ParameterError("inner", self.inner, f"exceeds the number of data points N = {n}")

    def _draw(self, n: int, k: int, generator: torch.Generator, device) -> Tensor:
        """k indices from range(n), with or without replacement."""
        if self.replace:
            return torch.randint(n, (k,), generator=generator).to(device)
        return torch.randperm(n, generator=generator)[:k].to(device)

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        if self.layout == "shared":
            state = pool.merge(self._shared(pool, queries, sources, sigma, generator, tile_bytes))
        else:  # the gathered rows are every process's: nothing to merge
            state = self._independent(pool, queries, sources, sigma, generator, tile_bytes)
        if self.C is not None:
            x_s, sq_s = pool.rows(sources)
            inv_var = 1.0 / (sigma * sigma)
            logit = ((queries * x_s).sum(dim=1) - 0.5 * sq_s) * inv_var
            state.add_one(logit - math.log(self.C), x_s)
        return state.mean()

    def _shared(self, pool, queries, sources, sigma, generator, tile_bytes) -> SoftmaxState:
        k, share = self.n_random, self.share
        assert share is not None  # the shared layout has one (``__post_init__``)
        spare = self.exclude_source and not self.replace and k < pool.n
        states = []
        for start in range(0, queries.shape[0], share):
            q = queries[start : start + share]
            src = sources[start : start + share]
            idx = self._draw(pool.n, k + int(spare), generator, queries.device)
            exclude = None
            if self.exclude_source:
                exclude = src
                if spare:  # the spare point is dropped where the source did not take a slot
                    exclude = torch.where(torch.isin(src, idx), src, idx[-1])
            states.append(pool.accumulate(q, sigma, idx, exclude, tile_bytes))
        return SoftmaxState(
            m=torch.cat([s.m for s in states]),
            z=torch.cat([s.z for s in states]),
            acc=torch.cat([s.acc for s in states]),
        )

    def _independent(self, pool, queries, sources, sigma, generator, tile_bytes) -> SoftmaxState:
        b, d = queries.shape
        k = self.n_random
        n = pool.n
        if self.replace:
            if self.exclude_source:
                idx = torch.randint(n - 1, (b, k), generator=generator).to(queries.device)
                idx += (idx >= sources[:, None]).long()  # skip the source
            else:
                idx = torch.randint(n, (b, k), generator=generator).to(queries.device)
        else:
            keys_rand = torch.rand(b, n, generator=generator).to(queries.device)
            if self.exclude_source:
                keys_rand[torch.arange(b, device=queries.device), sources] = -1.0
            idx = keys_rand.topk(k, dim=1).indices
        inv_var = 1.0 / (sigma * sigma)
        state = SoftmaxState.empty(b, d, queries.dtype, queries.device)
        step = max(1, tile_bytes // (queries.element_size() * d * b))
        for start in range(0, k, step):
            cols = idx[:, start : start + step]
            keys, sq = pool.rows(cols)  # B×n×D gather: the memory-bound part
            logits = torch.bmm(keys, queries[:, :, None])[:, :, 0]
            logits.mul_(inv_var).sub_(sq * (0.5 * inv_var))
            state.add_batched(logits, keys)
        return state


@ESTIMATORS.register("snis")
@dataclass(frozen=True, kw_only=True)
class SNIS(Subset):
    """Self-normalised importance sampling: μ over L random points, no source term."""

    name: ClassVar[str] = "snis"
    exclude_source: bool = False

    def _check_C(self) -> None:
        if self.C is not None:
            raise ParameterError("C", self.C, "applies to cdol only, not snis")


@ESTIMATORS.register("dol")
@dataclass(frozen=True, kw_only=True)
class DOL(Subset):
    """The source plus L−1 random points, all weighted alike: cDOL with C = 1."""

    name: ClassVar[str] = "dol"
    C: float | None = 1.0

    def _check_C(self) -> None:
        if self.C != 1:
            raise ParameterError("C", self.C, "applies to cdol only; dol is C = 1")
        object.__setattr__(self, "C", 1.0)


@ESTIMATORS.register("cdol")
@dataclass(frozen=True, kw_only=True)
class CDOL(Subset):
    """The source weighted 1/C plus L−1 random points (docs/method.md §3, reconstructed)."""

    name: ClassVar[str] = "cdol"
    C: float = field()

    @classmethod
    def for_pool(cls, n: int, **given: Any) -> Estimator:
        """As ``Estimator.for_pool``, C by ``resolve_C`` (default ``paper``: 4N/L) of the L
        used."""
        inner = given.get("inner", cls.defaults_for(n)["inner"])
        return super().for_pool(n, **{**given, "C": resolve_C(given.get("C"), n, max(inner, 2))})

    def _check_C(self) -> None:
        try:
            value = float(self.C)  # "inf" as recorded in results
        except (TypeError, ValueError):
            raise ParameterError("C", self.C, "expected a number") from None
        if not value > 0:
            raise ParameterError(
                "C", self.C, "the correction C must be > 0 (1 is DOL, inf is SNIS)"
            )
        object.__setattr__(self, "C", value)


def resolve_C(c: str | float | None, n: int, inner: int) -> float:
    """C from a number, ``paper`` (4N/L, the default) or ``balanced`` ((N−1)/(L−1))."""
    if c is None or c == "paper":
        return 4.0 * n / inner
    if c == "balanced":
        return (n - 1) / (inner - 1)
    try:
        value = float(c)
    except (TypeError, ValueError):
        raise ParameterError("C", c, "expected a number, 'paper' (4N/L) or 'balanced'") from None
    if not value > 0:
        raise ParameterError("C", c, "the correction C must be > 0 (1 is DOL, inf is SNIS)")
    return value
