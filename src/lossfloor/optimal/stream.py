"""Streamed estimation: a pool whose keys are read from a ``ChunkedDataset`` chunk by chunk.

For every outer block, ``StreamedPool.key_chunks`` reads this process's rows in chunks,
centres them with the global x̄ (float64, as ``Pool.from_data`` centres them), casts and
augments them (``kernel.augment``), and ``Pool.accumulate`` folds each chunk into the block's
softmax state (``accumulate_softmax(..., state=...)``). Rows asked for by index (the draws'
sources and their neighbours, the random inner sets of snis/dol/cdol) are read by index.
Memory: one chunk of keys (``chunk_mb``: its float32 rows, their float64 centred copy and the
augmented keys) plus the kernel's tile and one outer block, never N×D. The ``gram`` estimator's
products are filled per chunk (``ChunkProducts``: a block of draws times this process's N/K
rows, O(B·N/K)) and the rows its draws pick are read by index (``bags``).

A chunk holds a multiple of the kernel's tile (``keys_per_tile``) where ``chunk_mb`` allows
one, so the tiles are those of the in-memory pool and, with the same x̄, the numbers are the
same bits (x̄ is Σ/N over 4096-row blocks here, torch's mean in memory: the same bits for pixel
data, whose float64 sums are exact, and within a few float64 ulps for float data). Smaller
chunks cut the tiles: the kernel raises each query's running max exactly, so the key that holds
a posterior weighs exactly 1 in any chunk and the numbers differ by the rounding of the other
keys' weights, relative to each draw's value, however small J* is.

Under torchrun it is a ``ShardedPool``: each process reads only its rows [⌊rN/K⌋, ⌊(r+1)N/K⌋)
(and its 1/K of the statistics pass), the states merge as there.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lossfloor.data.chunked import ChunkedDataset
from lossfloor.data.dataset import Dataset
from lossfloor.distributed import Group
from lossfloor.errors import UserError
from lossfloor.optimal.kernel import augment
from lossfloor.optimal.shard import ShardedPool, bag_offsets

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def chunk_rows(chunk_mb: float, dim: int, dtype: torch.dtype) -> int:
    """Rows of one chunk of ``chunk_mb`` MiB: each row's float32 values, float64 centred copy,
    its cast and its augmented key (≈ (12 + 2·itemsize)·D bytes)."""
    per_row = (12 + 2 * dtype.itemsize) * dim
    return max(1, int(chunk_mb * 2**20) // per_row)


@dataclass
class StreamedPool(ShardedPool):
    """This process's rows [start, stop) of a ``ChunkedDataset``, read when the kernel needs
    them. ``x``, ``sq`` and ``aug`` hold no rows (they carry the dtype, device and widths)."""

    data: ChunkedDataset | None = None
    stop: int = 0
    chunk: int = 1  # rows per chunk

    @classmethod
    def from_stream(
        cls, data: ChunkedDataset, dtype: torch.dtype, device: torch.device | str, group: Group
    ) -> StreamedPool:
        """The pool of ``data`` (summarised) on this process's shard of ``group``."""
        s = data.summary
        start, stop = group.shard(data.n)
        empty = torch.empty(0, data.dim, dtype=dtype, device=device)
        return cls(
            x=empty,
            sq=empty[:, 0],
            mean=s.mean.to(device),
            a=s.sq_sum / data.n,
            max_sq=s.sq_max,
            group=group,
            start=start,
            total=data.n,
            data=data,
            stop=stop,
            chunk=chunk_rows(data.chunk_mb, data.dim, dtype),
        )

    def _held(self, idx: Tensor) -> Tensor:
        return (idx >= self.start) & (idx < self.stop)

    def _centred(self, rows: Tensor) -> Tensor:
        """x − x̄ in float64 (the float32 rows are freed by the caller)."""
        return rows.to(device=self.mean.device, dtype=torch.float64).sub_(self.mean)

    def _keys(self, rows: Tensor) -> Tensor:
        return augment(self._centred(rows).to(self.x.dtype))

    def whole(self) -> Tensor | None:
        return None

    @property
    def n_held(self) -> int:
        return self.stop - self.start

    def products(self, pad: int = 0) -> ChunkProducts:
        """Products with this process's rows read per chunk (``ChunkProducts``)."""
        return ChunkProducts(pool=self, pad=pad)

    def _read(self, idx: Tensor | None = None, lo: int = 0, hi: int = 0) -> tuple[Tensor, Tensor]:
        """(x_n − x̄ in the pool's dtype, ‖x_n − x̄‖²) of the rows at ``idx``, else of rows
        [lo, hi): centred in float64 and cast as ``Pool.from_data`` does."""
        rows = self._data.rows(lo, hi) if idx is None else self._data.take(idx)
        xc = self._centred(rows)
        return xc.to(self.x.dtype), xc.pow(2).sum(dim=1).to(self.x.dtype)

    def _bag_sums(
        self, local: Tensor, bag: Tensor, sums: Tensor, norms: Tensor, at: Tensor
    ) -> None:
        """``ShardedPool._bag_sums`` of rows read by index: each distinct row once, ``chunk``
        rows at a time."""
        rows, inverse = torch.unique(local, return_inverse=True)
        for lo in range(0, rows.numel(), self.chunk):
            x, sq = self._read(rows[lo : lo + self.chunk] + self.start)
            mine = torch.nonzero((inverse >= lo) & (inverse < lo + x.shape[0])).flatten()
            part = inverse[mine] - lo
            sums += F.embedding_bag(part, x, bag_offsets(bag[mine], sums.shape[0]), mode="sum")
            norms[at[mine]] = sq[part]

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(x_n − x̄, ‖x_n − x̄‖²) of any pool indices (any shape): this process reads those it
        holds, one all-reduce sum on K > 1 processes."""
        flat = idx.reshape(-1)
        d = self.dim
        out = torch.zeros(flat.numel(), d + 1, dtype=self.x.dtype, device=self.x.device)
        held = self._held(flat)
        if bool(held.any()):
            out[held, :d], out[held, d] = self._read(flat[held])
        self.group.sum(out)
        return out[:, :d].reshape(*idx.shape, d), out[:, d].reshape(idx.shape)

    def norms(self, idx: Tensor) -> Tensor:
        """‖x_n − x̄‖² of any pool indices (any shape): the rows read (``rows``)."""
        return self.rows(idx)[1]

    def keys_of(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        mask = self._held(idx)
        held = idx[mask]
        return self._keys(self._data.take(held)), held, torch.nonzero(mask).flatten()

    def key_chunks(
        self, step: int, idx: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Keys read and augmented per chunk: a multiple of ``step`` rows where the chunk holds
        one (the in-memory pool's tiles), else ``chunk`` rows."""
        size = self.chunk if self.chunk < step else self.chunk // step * step
        device = self.x.device
        if idx is None:
            for lo in range(self.start, self.stop, size):
                hi = min(self.stop, lo + size)
                keys = self._keys(self._data.rows(lo, hi))
                yield keys, torch.arange(lo, hi, device=device), None
            return
        at = torch.nonzero(self._held(idx)).flatten()
        for lo in range(0, at.numel(), size):
            part = at[lo : lo + size]
            yield self._keys(self._data.take(idx[part])), idx[part], part

    @property
    def _data(self) -> ChunkedDataset:
        assert self.data is not None  # from_stream sets it
        return self.data


@dataclass(frozen=True)
class ChunkProducts:
    """``pools.Products`` of a ``StreamedPool``: its rows read ``pool.chunk`` at a time, centred
    and cast (``StreamedPool._read``); a call holds one chunk and the B×columns products."""

    pool: StreamedPool
    pad: int = 0

    def __call__(self, rows: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pool = self.pool
        width = pool.n_held + self.pad
        out = rows.new_zeros(rows.shape[0], width) if out is None else out.zero_()
        half_sq = rows.new_full((width,), math.inf)
        for lo in range(pool.start, pool.stop, pool.chunk):
            hi = min(pool.stop, lo + pool.chunk)
            x, sq = pool._read(lo=lo, hi=hi)
            out[:, lo - pool.start : hi - pool.start] = rows @ x.T
            half_sq[lo - pool.start : hi - pool.start] = 0.5 * sq
        return out, half_sq


#: Bytes per data element of an in-memory estimate on one process: the float32 items, the
#: pool's float64 copy while it is built, the float32 centred rows and augmented keys.
IN_MEMORY_BYTES = 4 + 8 + 4 + 4


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes per process of an in-memory estimate (``need``) against those it may use
    (``budget``); ``stream`` when they do not fit."""

    need: float
    budget: float

    @property
    def stream(self) -> bool:
        return self.need > self.budget


def memory_need(
    data: str, *, limit: int | None = None, world: int = 1, memory_bytes: float | None = None
) -> MemoryNeed | None:
    """The memory an in-memory estimate of the items at ``data`` (a path read by rows) needs
    per process of ``world``: every process holds the float32 items and its 1/K of the pool,
    need = n·D·(4 + (IN_MEMORY_BYTES − 4)/K); budget = ``memory_bytes``, default the memory
    available now shared by this machine's processes (``LOCAL_WORLD_SIZE``). None where the
    data do not stream: a named source (small: Fashion-MNIST is ~1 GB in memory) or a path
    not read by rows (loading it as asked says what is wrong)."""
    from lossfloor.data import NAMED_SOURCES
    from lossfloor.data.dataset import open_items

    if data in NAMED_SOURCES:
        return None
    try:
        items = open_items(data, limit=limit)
    except UserError:
        return None
    items.close()
    elements = items.n * math.prod(items.shape)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget = memory_bytes if memory_bytes is not None else available_bytes() / local
    return MemoryNeed(need=elements * (4 + (IN_MEMORY_BYTES - 4) / world), budget=budget)


def must_stream(
    data: str, group: Group, *, limit: int | None = None, memory_bytes: float | None = None
) -> MemoryNeed | None:
    """The library's rule for reading a path in chunks: the ``memory_need`` of an in-memory
    estimate of ``data`` where it exceeds the budget on any process of ``group`` (then every
    process streams: they read the data alike), else None. ``estimate_curve`` given a path and
    ``lossfloor estimate`` follow it."""
    need = memory_need(data, limit=limit, world=group.world, memory_bytes=memory_bytes)
    return need if group.any(need is not None and need.stream) and need is not None else None


def open_for_estimate(
    data: str, group: Group, *, limit: int | None = None
) -> Dataset | ChunkedDataset:
    """The items of the spec ``data`` for an estimate: a ``ChunkedDataset`` read per chunk where
    ``must_stream`` says so (with a note on the ``lossfloor.optimal`` logger), else the
    ``Dataset`` in memory (``load_dataset``)."""
    from lossfloor.data import load_dataset
    from lossfloor.data.chunked import open_chunked

    need = must_stream(data, group, limit=limit)
    if need is None:
        return load_dataset(data, limit=limit)
    log.info(
        "%s needs ~%.3g GiB per process in memory, more than %.3g GiB: streaming it",
        data, need.need / 2**30, need.budget / 2**30,
    )  # fmt: skip
    return open_chunked(data, limit=limit)


def available_bytes() -> float:
    """MemAvailable of /proc/meminfo (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
