"""Sharded estimation: each of K processes (torchrun) holds a contiguous slice of the N points.

Every query's softmax over the N keys is the exact merge of the K partial states (m_r, z_r,
acc_r) over the slices, the pattern of vocabulary-parallel cross-entropy:

    m = max_r m_r,   z = Σ_r z_r·e^(m_r − m),   acc = Σ_r acc_r·e^(m_r − m)

(one all-reduce MAX, one all-reduce SUM of [z | acc]). What is global stays global: the data
mean x̄ (from the whole data, bitwise as one process computes it), A = mean‖x − x̄‖² (a float64
all-reduce sum), max‖x − x̄‖² (the precision policy),
the rows of the draws' sources and of their neighbours (``rows``: each process contributes the
rows it holds to an all-reduce sum, exact since the others contribute zeros), and the neighbour
index (each process ranks its slice, the K top-k lists are merged). The draws and random inner
sets are drawn over global indices, identically on every process, so they do not depend on K;
every process ends with the same per-sample values, up to float reduction order against one
process. Gaussian items (``ShardedMixturePool``) shard the same way: each process holds its
items' m and s² and their per-σ keys (``mixture.MixturePool``), and merges the same states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lossfloor.distributed import Group
from lossfloor.errors import UserError
from lossfloor.optimal.capabilities import having, listed
from lossfloor.optimal.estimators import Estimator, declared
from lossfloor.optimal.kernel import SoftmaxState, rescaled
from lossfloor.optimal.mixture import MixturePool
from lossfloor.optimal.pools import Pool, moments_from_bags

Tensor = torch.Tensor


@dataclass
class ShardedPool(Pool):
    """This process's rows [start, start + len(x)) of a pool of ``total`` points, with the
    whole pool's x̄, A and max‖·‖²; ``n`` is the whole pool's N (the draws range over it)."""

    group: Group = field(default_factory=Group)
    start: int = 0
    total: int = 0

    @classmethod
    def from_shard(
        cls, data: Tensor, dtype: torch.dtype, device: torch.device | str, group: Group
    ) -> ShardedPool:
        """The pool of ``data`` (N×..., every process the same), keeping ``group.shard(N)``.

        x̄ is computed from the whole data as ``Pool.from_data`` computes it, so the centred rows
        are bitwise one process's (the neighbour index breaks ties between equal distances, as
        quantised pixels often give, by the rounding of these rows); A = Σ‖x − x̄‖²/N and
        max‖x − x̄‖² from all-reduced float64 sums and max."""
        n = data.shape[0]
        start, mean, xc, sq, top = centred_shard(data, device, group)
        sums = group.sum(sq.sum().reshape(1))
        xd = xc.to(dtype)
        return cls(
            x=xd,
            sq=sq.to(dtype),
            mean=mean,
            a=float(sums) / n,
            max_sq=top,
            group=group,
            start=start,
            total=n,
        )

    @property
    def n(self) -> int:
        return self.total

    @property
    def shards(self) -> int:
        return self.group.world

    @property
    def first(self) -> int:
        return self.start

    def _held(self, idx: Tensor) -> Tensor:
        return (idx >= self.start) & (idx < self.start + self.x.shape[0])

    def whole(self) -> Tensor | None:
        return self.x if self.shards == 1 and self.x.shape[0] == self.n else None

    def by_index(self, idx: Tensor, *tables: Tensor) -> list[Tensor]:
        """The entries of any pool indices ``idx`` (any shape) in each of ``tables`` (this
        process's rows of a per-row table, N_held×w or N_held, one dtype; idx.shape×w or
        idx.shape): each process fills the rows it holds, one all-reduce sum of them all
        (exact: the others add zeros)."""
        flat = idx.reshape(-1)
        cols = [t.reshape(t.shape[0], -1) for t in tables]
        widths = [c.shape[1] for c in cols]
        out = torch.zeros(flat.numel(), sum(widths), dtype=cols[0].dtype, device=cols[0].device)
        held = self._held(flat)
        local = flat[held] - self.start
        at = 0
        for c, w in zip(cols, widths, strict=True):
            out[held, at : at + w] = c[local]
            at += w
        self.group.sum(out)
        parts = out.split(widths, dim=1)
        return [p.reshape(*idx.shape, *t.shape[1:]) for p, t in zip(parts, tables, strict=True)]

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(x_n − x̄, ‖x_n − x̄‖²) of any pool indices (any shape): ``by_index``."""
        x, sq = self.by_index(idx, self.x, self.sq)
        return x, sq

    def norms(self, idx: Tensor) -> Tensor:
        """‖x_n − x̄‖² of any pool indices (any shape): ``by_index``."""
        return self.by_index(idx, self.sq)[0]

    @property
    def n_held(self) -> int:
        return int(self.x.shape[0])

    def mean_rows(self, idx: Tensor) -> Tensor:
        """The mean of the rows of each row of ``idx`` (B×L → B×D): ``bags``."""
        return self.bags(idx)[0]

    def bag_moments(self, idx: Tensor, centres: Tensor, threads: int = 1) -> Tensor:
        """``Pool.bag_moments`` through ``bags`` (its collectives; ``moments_from_bags``)."""
        return moments_from_bags(self, idx, centres)

    def bags(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(the mean of the rows of each row of ``idx``, their norms) (B×L → B×D, B×L): each
        process sums the rows it holds per row of ``idx`` and takes their norms (0 for the
        others), one all-reduce sum of B×(D + L), then the sums over L."""
        b, size = idx.shape
        flat = idx.reshape(-1)
        at = torch.nonzero(self._held(flat)).flatten()
        d = self.dim
        out = torch.zeros(b, d + size, dtype=self.x.dtype, device=self.x.device)
        norms = torch.zeros(b * size, dtype=self.x.dtype, device=self.x.device)
        self._bag_sums(flat[at] - self.start, at // size, out[:, :d], norms, at)
        out[:, d:] = norms.view(b, size)
        self.group.sum(out)
        return out[:, :d] / size, out[:, d:]

    def _bag_sums(
        self, local: Tensor, bag: Tensor, sums: Tensor, norms: Tensor, at: Tensor
    ) -> None:
        """Add this process's rows ``local`` (its row numbers, ordered by ``bag``: the row of
        ``sums`` each adds to) to ``sums``; their norms to positions ``at`` of ``norms``."""
        sums += F.embedding_bag(local, self.x, bag_offsets(bag, sums.shape[0]), mode="sum")
        norms[at] = self.sq[local]

    def keys_of(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        mask = self._held(idx)
        held = idx[mask]
        return self.augmented()[held - self.start], held, torch.nonzero(mask).flatten()

    def merge(self, state: SoftmaxState) -> SoftmaxState:
        """m = max_r m_r, then Σ_r of each state rescaled to m (``kernel.rescaled``)."""
        if self.group.world == 1:
            return state
        m = self.group.max(state.m.clone())
        own = rescaled(state, m)
        both = self.group.sum(torch.cat([own.z[:, None], own.acc], dim=1))
        return SoftmaxState(m=m, z=both[:, 0].contiguous(), acc=both[:, 1:].contiguous())

    def across(self, columns: Tensor) -> Tensor:
        return self.group.cat(columns, dim=1)


@dataclass
class ShardedMixturePool(ShardedPool, MixturePool):
    """This process's rows [start, start + len(x)) of a pool of ``total`` Gaussian items:
    ``mixture.MixturePool``'s per-σ keys (of its rows), softmax states and posterior, over
    ``ShardedPool``'s collectives: the states merged exactly (``merge``; acc is the 2D-wide
    [Σp σ²m/v | Σp s²/v]), any item's m − x̄ and s² by index for the draws (``items``: one
    all-reduce, as ``rows``). Global: x̄ (from the whole data, as one process computes it),
    A = Σ_i(‖m_i − x̄‖² + Σ_d s_id²)/N and max‖m − x̄‖² (float64 all-reduces), and the
    per-element range of s² (all-reduced min and max: every shard's keys take the same
    reference r_d, so their logits are one softmax's)."""

    @classmethod
    def from_items_shard(
        cls, data: Tensor, std: Tensor, dtype: torch.dtype, device: torch.device | str,
        group: Group,
    ) -> ShardedMixturePool:  # fmt: skip
        """The pool of items N(data_i, diag std_i²) (N×..., both, every process the same),
        keeping ``group.shard(N)``."""
        n = data.shape[0]
        start, mean, mc, sq, top = centred_shard(data, device, group)
        rows = mc.shape[0]
        var = std[start : start + rows].reshape(rows, -1).to(device=device, dtype=torch.float64)
        var = var.pow(2)
        total = group.sum((sq + var.sum(dim=1)).sum().reshape(1))
        edge = var.new_full((1, var.shape[1]), math.inf)  # an empty shard's min and max
        lo = group.max(torch.cat([var, edge]).amin(dim=0).neg()).neg()
        hi = group.max(torch.cat([var, -edge]).amax(dim=0))
        return cls.of_items(
            mc, var, sq, mean, dtype, a=float(total) / n, max_sq=top, var_lo=lo, var_hi=hi,
            group=group, start=start, total=n,
        )  # fmt: skip

    def items(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(m_i − x̄, s_i²) of any items ``idx`` (B), float64: ``by_index``."""
        means, var = self.by_index(idx, self.means, self.var)
        return means, var


def centred_shard(
    data: Tensor, device: torch.device | str, group: Group
) -> tuple[int, Tensor, Tensor, Tensor, float]:
    """(this process's first row, x̄ of the whole ``data`` (N×..., as ``Pool.from_data``
    computes it, so the rows are bitwise one process's), its rows ``group.shard(N)`` centred
    (float64, flattened), their ‖x − x̄‖², the max ‖x − x̄‖² over every process)."""
    n = data.shape[0]
    start, stop = group.shard(n)
    mean = data.reshape(n, -1).to(device=device, dtype=torch.float64).mean(dim=0)
    x64 = data[start:stop].reshape(stop - start, -1).to(device=device, dtype=torch.float64)
    xc = x64 - mean
    sq = xc.pow(2).sum(dim=1)
    top = group.max(torch.cat([sq, sq.new_full((1,), -math.inf)]).max().reshape(1))
    return start, mean, xc, sq, float(top)


def bag_offsets(bag: Tensor, bags: int) -> Tensor:
    """The start of each of ``bags`` bags in a list of entries ordered by bag (``bag``: the bag
    of each entry), as ``F.embedding_bag`` takes them (an empty bag sums to 0)."""
    ends = torch.cumsum(torch.bincount(bag, minlength=bags), dim=0)
    return torch.cat([ends.new_zeros(1), ends[:-1]])


def check_sharded(
    estimator: Estimator, conditional: bool, group: Group, streamed: bool = False
) -> None:
    """UserError (before any work) for what does not run on K > 1 sharded processes yet, or
    on a chunked dataset (``streamed``: the pools are read per chunk, ``stream.StreamedPool``):
    a conditional estimate, or an estimator without the capability (``capabilities.runs_on``;
    ``Estimator.refusal`` gives the reason)."""
    if group.world == 1 and not streamed:
        return
    place = "streamed" if streamed else "sharded"
    able = listed(having(declared(), lambda caps: place in caps.runs_on))
    where, fix = (
        ("streamed data (--stream)", "load the data in memory")
        if streamed
        else (f"{group.world} processes", "run it in one process")
    )
    if conditional:
        why = "a conditional estimate (--conditional)"
    elif (reason := estimator.refusal(place)) is not None:
        why = f"the {estimator.name} estimator"
        fix = f"it lacks the capability '{place}': {reason}; {fix}"
    else:
        return
    raise UserError(f"{why} does not run on {where} yet; {fix} ({place}: {able})")
