"""The optimal denoiser D*(x, σ, labels) = E[x0 | x0 + σε = x] of an empirical dataset."""

from __future__ import annotations

import torch
from torch import nn

from lossfloor.data import Dataset
from lossfloor.errors import UserError
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.pool_cache import PoolsByDtype
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.precision import base_dtype, choose_dtype

Tensor = torch.Tensor


class OptimalDenoiser(nn.Module):
    """D*(x, σ, labels) = Σ_n softmax_n(−‖x − x_n‖²/2σ²)·x_n over the empirical set; with
    ``conditional``, over the points of each query's class (labels required). Of Gaussian
    items N(m_i, diag s_i²): D* = Σ_i w_i(x)·(σ²m_i + s_i²x)/(s_i² + σ²) (``mixture.py``)."""

    def __init__(self, dataset: Dataset, conditional: bool = False, precision: str = "auto"):
        super().__init__()
        if conditional and dataset.labels is None:
            raise UserError("a conditional optimal denoiser needs labels; this dataset has none")
        self.shape = dataset.shape
        self.conditional = conditional
        base_dtype(precision)  # an unknown policy fails here, not at the first call
        self.precision = precision
        flat = dataset.flat()
        keys = torch.unique(dataset.labels).tolist() if conditional else [-1]
        self.groups = {key: i for i, key in enumerate(keys)}  # class → its pool's index
        # the plan's draws play no part: its groups (every point, or each class) are the pools'
        labels = dataset.labels if conditional else None
        std = None if dataset.std is None else dataset.std.reshape(flat.shape)
        plan = OuterPlan.build(flat, labels, max(2, flat.shape[0]), 0, conditional, std)
        self._pools = PoolsByDtype(plan, torch.device("cpu"))

    def _pool(self, key: int, dtype: torch.dtype) -> Pool:
        return self._pools(dtype)[self.groups[key]]

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        if self.conditional and labels is None:
            raise UserError("the conditional optimal denoiser needs class labels")
        n = x.shape[0]
        flat = x.reshape(n, -1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).cpu()
        s = s.expand(n) if s.numel() == 1 else s
        keys = labels.reshape(-1).tolist() if labels is not None and self.conditional else [-1] * n
        unknown = sorted(set(keys) - set(self.groups))
        if unknown:
            raise UserError(f"the optimal denoiser has no data points of class {unknown[0]}")
        out = torch.empty(n, flat.shape[1], dtype=torch.float64)
        key_t = torch.tensor(keys)
        for key in set(keys):
            for sv in torch.unique(s[key_t == key]).tolist():
                sel = torch.nonzero((key_t == key) & (s == sv)).flatten()
                base = self._pool(key, base_dtype(self.precision))
                dtype = choose_dtype(self.precision, [base], sv)
                pool = self._pool(key, dtype)
                q = pool.centre(flat[sel].cpu())
                q = q.to(dtype)
                out[sel] = pool.uncentre(pool.posterior(pool.accumulate(q, sv), q))
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)
