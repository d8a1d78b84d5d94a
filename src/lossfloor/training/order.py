"""The data order of training and the batches it gives: the k-th image seen is position k mod N
of a permutation per epoch ⌊k/N⌋, seeded by (seed, epoch) — a pure function of the images seen,
so a resumed run (or process r of K, taking its rows of each global batch) sees the same images.
Gaussian items (``Dataset.std``, VAE latents) are drawn afresh at every step, as EDM2 does:
x0 = m + s·z, z ~ N(0, I) from the stream (seed, LATENT, step), again a pure function of the
step."""

from __future__ import annotations

import torch

from lossfloor.data import Dataset
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


class Batches:
    """The training batches of ``dataset`` on ``device``: global batch k (0-based step) holds the
    items at positions kB … kB+B−1 of the ``DataOrder``; its x0 is the items themselves for
    points (no draw) and m + s·z for Gaussian items, z ~ N(0, I) of the whole global batch from
    a CPU generator seeded by (seed, LATENT, k) (every process draws all B rows and keeps its
    own, so K processes see one process's x0). Labels only where ``conditional``."""

    def __init__(
        self, dataset: Dataset, seed: int, batch: int, conditional: bool, device: torch.device
    ) -> None:
        self.order = DataOrder(dataset.n, seed)
        self.seed, self.batch = seed, batch
        self.x = dataset.x.to(device)
        self.std = None if dataset.std is None else dataset.std.to(device)
        labels = dataset.labels if conditional else None
        self.labels = None if labels is None else labels.to(device)

    def take(self, step: int, rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, labels) of rows [lo, hi) of global batch ``step``."""
        b, (lo, hi) = self.batch, rows
        idx = self.order.indices(step * b, b)[lo:hi].to(self.x.device)
        x0 = self.x[idx]
        if self.std is not None:
            g = generator_for(self.seed, Stream.LATENT, step)
            z = torch.randn((b, *self.x.shape[1:]), generator=g)[lo:hi].to(self.x.device)
            x0 = x0 + self.std[idx] * z
        return x0, None if self.labels is None else self.labels[idx]
