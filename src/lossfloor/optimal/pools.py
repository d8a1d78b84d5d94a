"""The one data interface of the estimators: a ``Pool`` gives the centred rows, norms, keys,
softmax states and products an estimator needs through its methods; nothing outside the pool
kinds (this module, ``shard.py``, ``stream.py``, ``mixture.py``) reads a pool's arrays (``x``,
``sq``, ``aug``, ``mean``; tests/test_pools.py checks it).

``Pool`` holds every row in memory; ``shard.ShardedPool`` holds this process's rows and
implements each method with collectives; ``stream.StreamedPool`` reads rows per chunk. A method
a pool kind cannot implement within its memory raises a ``UserError`` naming it, and the
estimators that need it declare so (``Capabilities.why_not``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lossfloor.optimal.kernel import (
    DEFAULT_TILE_BYTES,
    Adjust,
    SoftmaxState,
    accumulate_softmax,
    augment,
    keys_per_tile,
    logit_error_bound,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Products:
    """Products with every row X this process holds (``Pool.products``): ``keys`` X (padded
    with zero rows) and ``half_sq`` ½‖x‖² (padded with +∞: a padded key's logit is −∞)."""

    keys: Tensor
    half_sq: Tensor

    def __call__(self, rows: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(rows·Xᵀ (B×columns, padding included: one GEMM; into ``out`` where given, a
        reused buffer: a fresh one of this size is mapped page by page), ½‖x‖² per column):
        the kernel's logits times σ² are rows·x_n − ½‖x_n‖²."""
        if out is None:
            return rows @ self.keys.T, self.half_sq
        return torch.mm(rows, self.keys.T, out=out), self.half_sq


def moments_from_bags(pool: Pool, idx: Tensor, centres: Tensor) -> Tensor:
    """``Pool.bag_moments`` from ``pool.bags`` and ``pool.rows`` (any pool kind): Σx_j = L·mean,
    Σ‖x_j − x_c‖² = Σ‖x_j‖² − 2x_c·Σx_j + L‖x_c‖², in float64."""
    big = idx.shape[1]
    mean, norms = pool.bags(idx)
    x_c, sq_c = pool.rows(centres)
    total, x_c = big * mean.double(), x_c.double()
    norms = norms.double().sum(dim=1)
    dot = (total * x_c).sum(dim=1)
    spread = (total - big * x_c).pow(2).sum(dim=1)
    moments = [norms, dot, total.pow(2).sum(dim=1), norms - 2.0 * dot + big * sq_c.double()]
    return torch.stack([*moments, spread], dim=1)


#: Rows squared per pass in ``Pool.from_data`` (each row's sum is the same whatever the split;
#: the whole float64 N×D square is never held).
SQUARE_ROWS = 8192


@dataclass
class Pool:
    """The points a posterior ranges over: centred data x_n − x̄ (N×D), ‖x_n − x̄‖², A = mean‖·‖²,
    max‖·‖² (float64, whatever the pool's dtype), the kernel's keys [x | 1 | −‖x‖²/2] (``aug``:
    made at first use, ``augmented``), and, for the neighbour-aware estimators and draws, the
    neighbour table (N×(k+1): row n is n and its k nearest points where n is a source of the
    draws; ``neighbours.neighbour_tables``)."""

    x: Tensor
    sq: Tensor
    mean: Tensor
    a: float
    max_sq: float
    aug: Tensor | None = None
    neighbours: Tensor | None = None
    #: Whether the items are Gaussians N(m_i, diag s_i²) (``mixture.MixturePool``), not points.
    gaussian: ClassVar[bool] = False

    @classmethod
    def from_data(cls, data: Tensor, dtype: torch.dtype, device: torch.device | str) -> Pool:
        x64 = data.reshape(data.shape[0], -1).to(device=device, dtype=torch.float64, copy=True)
        mean = x64.mean(dim=0)
        xc = x64.sub_(mean)  # centred in place: the copy above is ours
        sq = torch.cat([rows.pow(2).sum(dim=1) for rows in xc.split(SQUARE_ROWS)])  # per row
        xd = xc.to(dtype)
        return cls(x=xd, sq=sq.to(dtype), mean=mean, a=float(sq.mean()), max_sq=float(sq.max()))

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows, keys and softmax states."""
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        """Where the rows and keys are (queries go there)."""
        return self.x.device

    @property
    def width(self) -> int:
        """Columns of a key (``kernel.augment``: D + 2 rounded up to ``kernel.ALIGN``)."""
        return int(self.augmented().shape[1])

    def augmented(self) -> Tensor:
        """The kernel's keys [x | 1 | −‖x‖²/2 | 0…] of this pool's rows (``kernel.augment``),
        made at their first use (gram never reads them)."""
        if self.aug is None:
            self.aug = augment(self.x)
        return self.aug

    def centre(self, x: Tensor) -> Tensor:
        """x − x̄ of a batch (B×..., flattened to B×D), float64, on x̄'s device."""
        return (
            x.reshape(x.shape[0], -1).to(device=self.mean.device, dtype=torch.float64) - self.mean
        )

    def uncentre(self, x: Tensor) -> Tensor:
        """x + x̄ (B×D), float64: centred values back in the data's coordinates."""
        return x.double() + self.mean

    # What a sharded pool (``shard.ShardedPool``: this process's rows of the data) does with
    # collectives; a whole pool holds every row and needs none.
    @property
    def shards(self) -> int:
        """The number of processes the pool's rows are split over (1: this pool holds all)."""
        return 1

    @property
    def first(self) -> int:
        """The pool index of this process's first row."""
        return 0

    def whole(self) -> Tensor | None:
        """Every centred row (N×D) where this process holds them all in memory, else None
        (read them by index: ``rows``)."""
        return self.x

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(x_n − x̄, ‖x_n − x̄‖²) of the pool indices ``idx``, of any shape (idx.shape×D,
        idx.shape)."""
        return self.x[idx], self.sq[idx]

    def draw(self, idx: Tensor, component: Tensor | None) -> Tensor:
        """The centred x0 of draws from the items ``idx`` (B): the points themselves (``rows``;
        ``component``, the z of Gaussian items' x0 = m + s⊙z, is None for points)."""
        return self.rows(idx)[0]

    def posterior(self, state: SoftmaxState, queries: Tensor) -> Tensor:
        """μ of the centred ``queries`` from their softmax state over this pool's keys
        (``accumulate``, ``merge``): acc/z (``SoftmaxState.mean``)."""
        return state.mean()

    def logit_error(self, sigma: float, dtype: torch.dtype) -> float:
        """A bound on one logit's rounding error at σ in ``dtype`` (``kernel.logit_error_bound``
        of this pool's max‖x − x̄‖² and D): the precision policy's guard."""
        return logit_error_bound(self.max_sq, self.dim, sigma, dtype)

    def norms(self, idx: Tensor) -> Tensor:
        """‖x_n − x̄‖² of the pool indices ``idx`` (any shape)."""
        return self.sq[idx]

    def mean_rows(self, idx: Tensor) -> Tensor:
        """The mean of the rows of each row of pool indices ``idx`` (B×L → B×D)."""
        return F.embedding_bag(idx, self.x, mode="mean")

    @property
    def n_held(self) -> int:
        """The number of rows this process holds (the columns of ``products``)."""
        return self.n

    def products(self, pad: int = 0) -> Callable[..., tuple[Tensor, Tensor]]:
        """Products with every row this process holds, ``pad`` zero rows after them
        (``Products``): in memory one GEMM per call; a streamed pool reads its rows per chunk."""
        if pad == 0:
            return Products(keys=self.x, half_sq=0.5 * self.sq)
        keys = F.pad(self.x, (0, 0, 0, pad))  # zero rows: their products are 0
        return Products(keys=keys, half_sq=F.pad(0.5 * self.sq, (0, pad), value=math.inf))

    def bags(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(the mean of the rows of each row of pool indices ``idx``, their norms ‖x_n − x̄‖²)
        (B×L → B×D, B×L): ``mean_rows`` and ``norms`` at once (one read of the rows where
        they are read by index)."""
        return self.mean_rows(idx), self.norms(idx)

    def bag_moments(self, idx: Tensor, centres: Tensor, threads: int = 1) -> Tensor:
        """Per row r of pool indices ``idx`` (R×L) with the centre row c = ``centres[r]``:
        [Σ_j‖x_j‖², x_c·Σ_j x_j, ‖Σ_j x_j‖², Σ_j‖x_j − x_c‖², ‖Σ_j (x_j − x_c)‖²] (R×5,
        float64; gram's U-statistics, ``--fused``): in memory one compiled pass over the rows
        (``fused.bag_moments``, in ``threads`` threads); a sharded or streamed pool through
        ``bags`` (``moments_from_bags``)."""
        from lossfloor.optimal import fused

        return fused.bag_moments(self.x, self.sq, idx, centres, threads)

    def keys_of(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(the kernel's keys, their pool indices, their positions in ``idx``; None: all, in
        order) of those of ``idx`` (a vector) that this pool holds."""
        return self.augmented()[idx], idx, None

    def key_chunks(
        self, step: int, idx: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """(the kernel's keys, their pool indices, their positions in ``idx`` or None where they
        are all of it in order) of this pool's rows, or of those of ``idx`` it holds, in order,
        in chunks of a multiple of ``step`` rows where they are read in chunks
        (``stream.StreamedPool``; here: one chunk)."""
        if idx is None:
            keys = self.augmented()
            yield (
                keys,
                torch.arange(self.first, self.first + keys.shape[0], device=keys.device),
                None,
            )
        else:
            yield self.keys_of(idx)

    def accumulate(
        self,
        queries: Tensor,
        sigma: float,
        idx: Tensor | None = None,
        exclude: Tensor | None = None,
        tile_bytes: int = DEFAULT_TILE_BYTES,
        *,
        key_logw: Tensor | None = None,
        adjust: Adjust | None = None,
    ) -> SoftmaxState:
        """This pool's softmax state of ``queries`` over its keys (or those of the pool indices
        ``idx``; key n masked for query b where n = exclude[b]; ``key_logw`` and ``adjust`` as
        ``kernel.accumulate_softmax``'s, by position in ``idx``), before ``merge``: each of
        ``key_chunks`` continues the state of the chunks before it."""
        b, d = queries.shape
        state = SoftmaxState.empty(b, d, queries.dtype, queries.device)
        step = keys_per_tile(b, queries.element_size(), tile_bytes)
        for keys, ids, at in self.key_chunks(step, idx):
            logw, adj = key_logw, adjust
            if at is not None:  # positions in ``idx``: its weights and additions, renumbered
                assert idx is not None
                logw = None if key_logw is None else key_logw[at]
                adj = None if adjust is None else _adjust_at(adjust, at, idx.numel())
            state = accumulate_softmax(
                queries, None, sigma, keys_aug=keys, key_ids=ids.to(keys.device),
                exclude_ids=exclude, key_logw=logw, adjust=adj, state=state,
                tile_bytes=tile_bytes,
            )  # fmt: skip
        return state

    def merge(self, state: SoftmaxState) -> SoftmaxState:
        """The softmax state over every shard's keys from this pool's (here: ``state``)."""
        return state

    def across(self, columns: Tensor) -> Tensor:
        """Every shard's ``columns`` (B×k), side by side (here: ``columns``)."""
        return columns


def _adjust_at(adjust: Adjust, at: Tensor, size: int) -> Adjust:
    """The entries of ``adjust`` (key positions in a list of ``size`` keys) of the keys at
    positions ``at`` of that list, renumbered to their positions in ``at``."""
    where = torch.full((size,), -1, dtype=torch.long, device=adjust.keys.device)
    where[at.to(where.device)] = torch.arange(at.numel(), device=where.device)
    pos = where[adjust.keys]
    keep = pos >= 0
    return Adjust(pos[keep], adjust.queries[keep], adjust.values[keep])
