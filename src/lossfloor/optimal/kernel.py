"""The one hot kernel: the posterior mean of noisy queries over a set of data points.

For VE noise σ and keys x_n with prior log-weights b_n, the posterior over keys given a query q is

    p(n | q) ∝ exp(b_n − ‖q − x_n‖² / 2σ²) ∝ exp(b_n + ⟨q, x_n⟩/σ² − ‖x_n‖²/2σ²),

(‖q‖² is the same for every key of a query and cancels), and μ(q) = Σ_n p(n|q)·x_n. The logits are
one GEMM and the weighted sum a second; keys are streamed in chunks with a running max per query
(online log-sum-exp), so memory is O(B·chunk + B·D), never O(B·N).

Precision: the expanded form loses digits when ‖x‖²/σ² is large and σ small. The data are centred
by the caller (J* is translation invariant), and `logit_error_bound` gives the guard that the
``"auto"`` precision policy uses to switch to float64 below a σ that depends on the data's norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

#: Default working-set budget for one logits tile (bytes).
DEFAULT_TILE_BYTES = 32 * 2**20


@dataclass
class SoftmaxState:
    """Running per-query (max logit m, Σ exp(l − m), Σ exp(l − m)·x)."""

    m: Tensor
    z: Tensor
    acc: Tensor

    @classmethod
    def empty(cls, b: int, d: int, dtype: torch.dtype, device: torch.device) -> SoftmaxState:
        return cls(
            m=torch.full((b,), -math.inf, dtype=dtype, device=device),
            z=torch.zeros(b, dtype=dtype, device=device),
            acc=torch.zeros(b, d, dtype=dtype, device=device),
        )

    def _rescale(self, new_max: Tensor) -> Tensor:
        """Raise the running max to ``new_max``; returns it with −inf rows kept finite."""
        m_new = torch.maximum(self.m, new_max)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(self.m - m_safe)  # exp(−inf) = 0 for empty rows
        self.z.mul_(scale)
        self.acc.mul_(scale[:, None])
        self.m = m_new
        return m_safe

    def add_block(self, logits: Tensor, values: Tensor) -> None:
        """Add keys shared by all queries: logits B×n, values n×D. Consumes ``logits``."""
        m_safe = self._rescale(logits.amax(dim=1))
        p = logits.sub_(m_safe[:, None]).exp_()
        self.z.add_(p.sum(dim=1))
        self.acc.addmm_(p, values)

    def add_batched(self, logits: Tensor, values: Tensor) -> None:
        """Add keys of each query's own: logits B×n, values B×n×D. Consumes ``logits``."""
        m_safe = self._rescale(logits.amax(dim=1))
        p = logits.sub_(m_safe[:, None]).exp_()
        self.z.add_(p.sum(dim=1))
        self.acc.add_(torch.bmm(p[:, None, :], values)[:, 0])

    def add_one(self, logit: Tensor, value: Tensor) -> None:
        """Add one key per query: logit B, value B×D."""
        m_safe = self._rescale(logit)
        p = torch.exp(logit - m_safe)
        self.z.add_(p)
        self.acc.add_(p[:, None] * value)

    def mean(self) -> Tensor:
        """μ = acc / z (rows with no keys give NaN, which callers must not produce)."""
        return self.acc / self.z[:, None]

    def log_normaliser(self) -> Tensor:
        """log Σ exp(logits) per query."""
        return self.m + torch.log(self.z)


def keys_per_tile(batch: int, itemsize: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """How many keys one tile holds so that the B×n logits stay within ``tile_bytes``."""
    return max(64, tile_bytes // (itemsize * max(batch, 1)))


def posterior_mean(
    queries: Tensor,
    keys: Tensor,
    sigma: float,
    *,
    keys_sq: Tensor | None = None,
    key_bias: Tensor | None = None,
    key_ids: Tensor | None = None,
    exclude_ids: Tensor | None = None,
    state: SoftmaxState | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> SoftmaxState:
    """Stream ``keys`` (N×D) for ``queries`` (B×D) at VE noise σ; returns the softmax state.

    logits_bn = ⟨q_b, x_n⟩/σ² − ‖x_n‖²/2σ² + bias_n, computed by one ``addmm`` per tile and
    folded into a per-query running max. ``state.mean()`` is μ(q); pass ``state`` to continue
    with further keys (e.g. a per-query source term, see ``SoftmaxState.add_one``).
    With ``key_ids`` (N) and ``exclude_ids`` (B), key n is masked out for query b where
    key_ids[n] == exclude_ids[b] (a query's own source inside a shared random set).
    """
    b, d = queries.shape
    if keys_sq is None:
        keys_sq = keys.pow(2).sum(dim=1)
    inv_var = 1.0 / (sigma * sigma)
    q_scaled = queries * inv_var
    bias = keys_sq * (-0.5 * inv_var)
    if key_bias is not None:
        bias = bias + key_bias
    if state is None:
        state = SoftmaxState.empty(b, d, queries.dtype, queries.device)
    step = keys_per_tile(b, queries.element_size(), tile_bytes)
    for start in range(0, keys.shape[0], step):
        chunk = keys[start : start + step]
        logits = torch.addmm(bias[start : start + step], q_scaled, chunk.T)
        if exclude_ids is not None and key_ids is not None:
            own = key_ids[start : start + step][None, :] == exclude_ids[:, None]
            logits.masked_fill_(own, -math.inf)
        state.add_block(logits, chunk)
    return state


def logit_error_bound(max_sq_norm: float, dim: int, sigma: float, dtype: torch.dtype) -> float:
    """A bound on the rounding error of one logit ⟨q,x⟩/σ² − ‖x‖²/2σ² in ``dtype``.

    δ ≈ u·(√D·‖q‖‖x‖ + ‖x‖²)/σ² with u the unit round-off, ‖q‖² ≤ R² + Dσ² (a typical noisy
    query) and ‖x‖² ≤ R². A relative error δ of the unnormalised weights moves μ by ≲ δ·spread.
    """
    u = torch.finfo(dtype).eps / 2
    r2 = max_sq_norm
    q = math.sqrt(r2 + dim * sigma * sigma)
    return u * (math.sqrt(dim) * q * math.sqrt(r2) + r2) / (sigma * sigma)
