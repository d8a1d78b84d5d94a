"""The pools of an estimate: which kind of pool a plan's data get (``make_pools``: in memory,
sharded over processes, streamed per chunk) and the pools per dtype a precision policy asks for
(``PoolsByDtype``). Above ``pools.py``, ``shard.py`` and ``stream.py`` (whose pool kinds it
builds), ``draws.py`` (the plan) and ``precision.py`` (the precision policy), so none of them
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lossfloor.data.chunked import ChunkedDataset
from lossfloor.distributed import Group
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.mixture import MixturePool
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.precision import FLOAT32_MAX_SQ_NORM, base_dtype, choose_dtype
from lossfloor.optimal.shard import ShardedMixturePool, ShardedPool
from lossfloor.optimal.stream import StreamedPool

Tensor = torch.Tensor


def make_pools(
    plan: OuterPlan, dtype: torch.dtype, device: torch.device, group: Group | None = None
) -> list[Pool]:
    """One centred pool per group (the whole set, or each class; a group of every point reads
    the data as they are, without a gathered copy); with a ``group`` of K > 1 processes, this
    process's shard of the whole set (``shard.ShardedPool``); of a ``ChunkedDataset``, its keys
    read per chunk (``stream.StreamedPool``, this process's shard); of Gaussian items (the
    plan's ``std``), a ``mixture.MixturePool`` per group (K > 1: this process's shard of the
    whole set, ``shard.ShardedMixturePool``)."""
    if isinstance(plan.data, ChunkedDataset):
        return [StreamedPool.from_stream(plan.data, dtype, device, group or Group())]
    if group is not None and group.world > 1:  # this process's shard of the whole set
        if plan.std is not None:
            return [ShardedMixturePool.from_items_shard(plan.data, plan.std, dtype, device, group)]
        return [ShardedPool.from_shard(plan.data, dtype, device, group)]
    if plan.std is not None:  # Gaussian items: one mixture pool per group
        return [
            MixturePool.from_items(plan.data[members], plan.std[members], dtype, device)
            for members, _ in plan.groups
        ]
    n = plan.data.shape[0]
    return [
        Pool.from_data(plan.data if members.numel() == n else plan.data[members], dtype, device)
        for members, _ in plan.groups
    ]


@dataclass
class PoolsByDtype:
    """``make_pools(plan, dtype, device)`` for each dtype a precision policy asks for, built on
    first use."""

    plan: OuterPlan
    device: torch.device
    group: Group | None = None  # K > 1 processes: each pool is this process's shard
    built: dict[torch.dtype, list[Pool]] = field(default_factory=dict)
    neighbours: list[Tensor] | None = None
    tilts: dict = field(default_factory=dict)  # the tilted draws' TiltBlocks, kept across σ

    def __call__(self, dtype: torch.dtype) -> list[Pool]:
        if dtype not in self.built:
            self.built[dtype] = make_pools(self.plan, dtype, self.device, self.group)
            self._attach(self.built[dtype])
        return self.built[dtype]

    def attach(self, tables: list[Tensor]) -> None:
        """Give every pool, built and to be built, its neighbour table."""
        self.neighbours = tables
        for pools in self.built.values():
            self._attach(pools)

    def _attach(self, pools: list[Pool]) -> None:
        if self.neighbours is not None:
            for pool, table in zip(pools, self.neighbours, strict=True):
                pool.neighbours = table

    def dtype_at(self, precision: str, sigma: float) -> torch.dtype:
        """The dtype ``precision`` works in at σ (``choose_dtype`` on the base dtype's pools)."""
        return choose_dtype(precision, self(base_dtype(precision)), sigma)

    def index_dtype(self, precision: str) -> torch.dtype:
        """The dtype of the neighbour index's distances ‖x_i − x_j‖² (no σ in them): the
        policy's base dtype; under ``auto`` float64 only where the data's squared norms exceed
        FLOAT32_MAX_SQ_NORM."""
        base = base_dtype(precision)
        if precision == "auto" and max(p.max_sq for p in self(base)) > FLOAT32_MAX_SQ_NORM:
            return torch.float64
        return base
