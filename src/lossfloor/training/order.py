"""The data order of training: the k-th image seen is position k mod N of a permutation per
epoch ⌊k/N⌋, seeded by (seed, epoch) — a pure function of the images seen, so a resumed run
(or process r of K, taking its rows of each global batch) sees the same images."""

from __future__ import annotations

import torch

from lossfloor.seeding import Stream, generator_for


class DataOrder:
    """Index of the k-th image seen: position k mod N of the permutation of epoch ⌊k/N⌋."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = generator_for(self.seed, Stream.DATA_ORDER, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        out, k = [], start
        while k < start + count:
            epoch, pos = divmod(k, self.n)
            take = min(self.n - pos, start + count - k)
            out.append(self._permutation(epoch)[pos : pos + take])
            k += take
        return torch.cat(out)
