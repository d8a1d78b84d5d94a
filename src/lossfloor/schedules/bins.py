"""Exponentially decayed per-bin sums over ln σ bins: the one accumulator of the optimal
schedule's online gap (``OptimalLossSchedule.observe``) and of ``lossfloor.GapTracker``.

Bins are uniform in ln σ (``log_edges``); a value observed at σ goes to the bin holding ln σ
(``bin_index``: the two outer bins extend to ±∞). After a batch of n observations every sum is
multiplied by d = 2^(−n/h) (``decay``: h the half-life in observations) and the batch's values
added (``decayed_add``): S ← d·S + Σ_{i in the bin} v_i.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def log_edges(sigma_min: float, sigma_max: float, bins: int) -> Tensor:
    """The bins + 1 edges, uniform in ln σ over [σ_min, σ_max] (float64)."""
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), bins + 1, dtype=torch.float64)


def bin_index(log_sigma: Tensor, edges: Tensor) -> Tensor:
    """The bin of each ln σ (0 … bins − 1; below the first edge 0, above the last bins − 1)."""
    return torch.bucketize(log_sigma, edges[1:-1])


def decay(n: int, half_life: float) -> float:
    """d = 2^(−n/h): the factor that halves the weight of past observations every h of them."""
    return 0.5 ** (n / half_life)


def decayed_add(total: Tensor, index: Tensor, values: Tensor, d: float) -> Tensor:
    """d·total + the values summed into their bins (``index``; rows of ``values`` along dim 0)."""
    return d * total + torch.zeros_like(total).index_add_(0, index, values)
