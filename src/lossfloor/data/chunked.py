"""Datasets larger than memory: items read in chunks of rows, never all at once.

A ``ChunkedDataset`` reads its items through ``formats.Items`` (an ``.npy`` by positioned reads,
a named source's cached memory map, image files of a folder or an EDM zip decoded per chunk),
scaled to [−1, 1] exactly as ``load_dataset`` scales them (``to_unit``), as float32 rows:
``rows(lo, hi)`` and ``take(idx)`` hold only the rows asked for.

Its ``Summary`` comes from two passes over fixed blocks of STATS_ROWS rows (``summarise``):

    x̄ = (Σ_b Σ_{n∈b} x_n)/N,   variance = mean_d Σ_b Σ_{n∈b} (x_nd − x̄_d)²/N,
    Σ_n ‖x_n − x̄‖²,   max_n ‖x_n − x̄‖²

(float64 sums, added block by block in block order), and, in the first pass, the fingerprints
of the data in memory: ``sha256`` = ``Dataset.sha256`` of the same items (``fingerprint`` of the
unscaled items) and ``tensor_sha256`` = the fingerprint ``OuterPlan`` takes of the in-memory
float32 tensor (the key of checkpoints, the neighbour index and cached J*), each one sha256 fed
the blocks in order (``Fingerprint``). Under torchrun each of K processes sums its 1/K of the
blocks and the per-block sums are gathered, so every number is the same bits for any K, and the
variance the bits ``mean_and_variance`` gives in memory (its chunks are the same blocks); a
sha256 cannot be split, so rank 0 reads every block in the first pass to hash it (the one
part not split: ≈ 5 bytes hashed per element of uint8 data, about a minute for ImageNet 64×64)
and sends the digests to the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lossfloor.data.dataset import Fingerprint, fingerprint, open_items, to_unit
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
    sha256: str  # Dataset.sha256 of the same items
    tensor_sha256: str  # fingerprint(x, "tensor") of the items as a float32 tensor N×shape


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

    @staticmethod
    def _main_digests(
        group: Group, hashes: tuple[Fingerprint, Fingerprint] | None
    ) -> tuple[str, str]:
        """The main process's hex digests (it hashed every block), on every process."""
        digests = None if hashes is None else (hashes[0].hexdigest(), hashes[1].hexdigest())
        main = group.gather(digests)[0]
        assert main is not None  # rank 0 is the main process
        return main

    def summarise(self, group: Group | None = None) -> Summary:
        """The ``Summary``, computed once (two passes; with a ``group``, each process sums its
        1/K of the blocks and rank 0 hashes them all, then one all-reduce per pass; the
        processes compare the shape and the first block, which each reads, before any work)."""
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
        hashes: tuple[Fingerprint, Fingerprint] | None = None
        with group.together():
            for b in range(blocks) if group.main else mine:
                lo, hi = b * STATS_ROWS, min(self.n, (b + 1) * STATS_ROWS)
                values = self.items.read(lo, hi)
                x = self._unit(values)
                if group.main:
                    hashes = hashes or self._hashes(values.dtype)
                    hashes[0].update(values)
                    hashes[1].update(x.numpy())
                if b in mine:
                    sums[b] = x.to(torch.float64).sum(dim=0)
        sums = _reduced(group.sum, sums, group)
        sha256, tensor_sha256 = self._main_digests(group, hashes)
        total = torch.zeros(d, dtype=torch.float64)
        for b in range(blocks):
            total += sums[b]
        mean = total / self.n
        squares = torch.zeros(blocks, d + 1, dtype=torch.float64)  # per element | Σ‖·‖²
        top = torch.full((blocks,), -math.inf, dtype=torch.float64)
        with group.together():
            for b in mine:
                lo, hi = b * STATS_ROWS, min(self.n, (b + 1) * STATS_ROWS)
                x = self.rows(lo, hi).to(torch.float64)
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
        self._summary = Summary(
            mean=mean,
            sq_sum=sq_sum,
            sq_max=float(top.max()),
            variance=float((per_element / self.n).mean()),
            sha256=sha256,
            tensor_sha256=tensor_sha256,
        )
        return self._summary

    def _hashes(self, dtype: np.dtype) -> tuple[Fingerprint, Fingerprint]:
        """The two fingerprints of the whole data, to be fed its blocks in order: of the
        unscaled items (of ``dtype``: ``Dataset.sha256``) and of the float32 tensor N×shape in
        [−1, 1] (``OuterPlan.fingerprint``'s, scale "tensor")."""
        return (
            Fingerprint(self.items.scale, dtype, (self.n, *self.shape)),
            Fingerprint("tensor", np.dtype(np.float32), (self.n, *self.shape)),
        )

    def describe(self) -> dict:
        """What identifies this dataset in a result file: ``Dataset.describe`` of the same
        items (the same sha256), with ``"streamed": true``."""
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
