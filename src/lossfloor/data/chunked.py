"""Datasets larger than memory: items read in chunks of rows, never all at once.

A ``ChunkedDataset`` reads its items through ``formats.Items`` (an ``.npy`` by positioned reads,
a named source's cached memory map, image files of a folder or an EDM zip decoded per chunk),
scaled to [−1, 1] exactly as ``load_dataset`` scales them (``to_unit``), as float32 rows:
``rows(lo, hi)`` and ``take(idx)`` hold only the rows asked for.

Its ``Summary`` comes from two passes over fixed blocks of STATS_ROWS rows (``summarise``):

    x̄ = (Σ_b Σ_{n∈b} x_n)/N,   variance = mean_d Σ_b Σ_{n∈b} (x_nd − x̄_d)²/N,
    Σ_n ‖x_n − x̄‖²,   max_n ‖x_n − x̄‖²,
    sha256 = sha256(header | sha256(block 0) | sha256(block 1) | …)

(float64 sums, added block by block in block order). Under torchrun each of K processes reads
its 1/K of the blocks and the per-block sums and digests are gathered, so every number is the
same bits for any K, and the variance the bits ``mean_and_variance`` gives in memory (its
chunks are the same blocks). The fingerprint hashes the raw items block by block, so it differs
from an in-memory ``Dataset.sha256`` of the same items (one hash of all bytes, which K
processes reading 1/K each cannot form).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lossfloor.data.dataset import fingerprint, open_items, to_unit
from lossfloor.data.formats import Items
from lossfloor.distributed import Group
from lossfloor.errors import ParameterError

Tensor = torch.Tensor

#: Rows per block of the statistics pass (and ``mean_and_variance``'s chunk): part of the
#: definition of the fingerprint, not a memory knob.
STATS_ROWS = 4096

#: Default memory of one chunk of keys in the streamed kernel (MiB; ``optimal.stream``).
DEFAULT_CHUNK_MB = 256.0


@dataclass(frozen=True)
class Summary:
    """The global statistics of a chunked dataset (see the module docstring)."""

    mean: Tensor  # x̄ per element, float64 (D)
    sq_sum: float  # Σ_n ‖x_n − x̄‖²
    sq_max: float  # max_n ‖x_n − x̄‖²
    variance: float  # per-element variance across items, averaged over elements
    sha256: str


class ChunkedDataset:
    """Items of ``spec`` read by rows (the interface of a ``Dataset`` for ``estimate_curve``:
    name, n, shape, dim, labels, describe), with ``chunk_mb`` the memory one chunk of the
    streamed kernel may take."""

    def __init__(self, name: str, items: Items, chunk_mb: float = DEFAULT_CHUNK_MB) -> None:
        if not (math.isfinite(chunk_mb) and chunk_mb > 0):
            raise ParameterError("chunk_mb", chunk_mb, "must be a finite number of MiB > 0")
        self.name, self.items, self.chunk_mb = name, items, chunk_mb
        self.labels = None if items.labels is None else torch.from_numpy(items.labels)
        self.xflip = False
        self._summary: Summary | None = None

    @property
    def n(self) -> int:
        return self.items.n

    def __len__(self) -> int:
        return self.items.n

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item."""
        return tuple(self.items.shape)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def rows(self, lo: int, hi: int) -> Tensor:
        """float32 items [lo, hi) in [−1, 1], flat ((hi − lo)×D)."""
        return self._unit(self.items.read(lo, hi))

    def take(self, idx: Tensor) -> Tensor:
        """float32 items at the indices ``idx`` (any order, repeats allowed), flat."""
        return self._unit(self.items.take(idx.cpu().numpy()))

    def _unit(self, values: np.ndarray) -> Tensor:
        return to_unit(values, self.items.scale, self.name).reshape(len(values), self.dim)

    @property
    def summary(self) -> Summary:
        """The statistics of ``summarise`` (which must have run)."""
        if self._summary is None:
            raise RuntimeError("summarise() the chunked dataset first")
        return self._summary

    @property
    def sha256(self) -> str:
        return self.summary.sha256

    def summarise(self, group: Group | None = None) -> Summary:
        """The ``Summary``, computed once (two passes; with a ``group``, each process reads its
        1/K of the blocks, then one all-reduce per pass; the processes compare the shape and
        the first block, which each reads, before any work)."""
        if self._summary is not None:
            return self._summary
        group = group or Group()
        blocks = -(-self.n // STATS_ROWS)
        mine = range(*group.shard(blocks))
        d = self.dim
        if group.world > 1:
            first = fingerprint(self.items.read(0, min(self.n, STATS_ROWS)), self.items.scale)
            group.check_same("data", f"{self.n} items of shape {self.shape}, first {first}")
        sums = torch.zeros(blocks, d, dtype=torch.float64)
        digests: dict[int, str] = {}
        with group.together():
            for b, x in self._blocks(mine, digests):
                sums[b] = x.sum(dim=0)
        sums = _reduced(group.sum, sums, group)
        everyone: dict[int, str] = {}
        for part in group.gather(digests):
            everyone.update(part)
        total = torch.zeros(d, dtype=torch.float64)
        for b in range(blocks):
            total += sums[b]
        mean = total / self.n
        squares = torch.zeros(blocks, d + 1, dtype=torch.float64)  # per element | Σ‖·‖²
        top = torch.full((blocks,), -math.inf, dtype=torch.float64)
        with group.together():
            for b, x in self._blocks(mine, None):
                x.sub_(mean).square_()  # in place, as mean_and_variance
                squares[b, :d] = x.sum(dim=0)
                sq = x.sum(dim=1)
                squares[b, d] = sq.sum()
                top[b] = sq.max()
        squares = _reduced(group.sum, squares, group)
        top = _reduced(group.max, top, group)
        per_element = torch.zeros(d, dtype=torch.float64)
        sq_sum = 0.0
        for b in range(blocks):
            per_element += squares[b, :d]
            sq_sum += float(squares[b, d])
        header = f"lossfloor-data-blocks-v1|{self.items.scale}|{self.n}|{self.shape}|{STATS_ROWS}|"
        digest = hashlib.sha256(header.encode())
        for b in range(blocks):
            digest.update(bytes.fromhex(everyone[b]))
        self._summary = Summary(
            mean=mean,
            sq_sum=sq_sum,
            sq_max=float(top.max()),
            variance=float((per_element / self.n).mean()),
            sha256=digest.hexdigest(),
        )
        return self._summary

    def _blocks(self, which: range, digests: dict[int, str] | None) -> Iterator[tuple[int, Tensor]]:
        """(b, float64 rows of block b) for the blocks ``which``; the raw rows' sha256 into
        ``digests``."""
        for b in which:
            lo, hi = b * STATS_ROWS, min(self.n, (b + 1) * STATS_ROWS)
            values = self.items.read(lo, hi)
            if digests is not None:
                digests[b] = fingerprint(values, self.items.scale)
            yield b, self._unit(values).to(torch.float64)

    def describe(self) -> dict:
        """What identifies this dataset in a result file (``Dataset.describe``, with the block
        fingerprint and ``"streamed": true``)."""
        return {
            "name": self.name,
            "n": self.n,
            "shape": list(self.shape),
            "sha256": self.sha256,
            "xflip": False,
            "labels": self.labels is not None,
            "num_classes": self.num_classes,
            "streamed": True,
        }


def _reduced(op: Callable[[Tensor], Tensor], tensor: Tensor, group: Group) -> Tensor:
    """``op`` (``group.sum`` or ``group.max``) of a CPU tensor, on the group's device (NCCL
    reduces GPU tensors only), back on the CPU."""
    if group.world == 1:
        return tensor
    return op(tensor.to(group.device)).cpu()


def open_chunked(
    spec: str, *, limit: int | None = None, chunk_mb: float = DEFAULT_CHUNK_MB
) -> ChunkedDataset:
    """The ``ChunkedDataset`` of a named source, ``.npy`` file, image folder or EDM zip (the
    specs of ``load_dataset`` but ``.npz``), its first ``limit`` items."""
    return ChunkedDataset(spec, open_items(spec, limit=limit), chunk_mb)
