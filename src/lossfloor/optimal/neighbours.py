"""Exact k nearest neighbours of the outer draws' sources, for the neighbour-aware estimators
(the ``stratified`` inner estimator's near stratum, the ``tilted`` outer draws).

Ranking the points x_j by distance to x_i is ranking them by

    s_ij = ⟨x_i, x_j⟩ − ‖x_j‖²/2 = (‖x_i‖² − ‖x_i − x_j‖²)/2,

which is the kernel's logit at σ = 1 with queries [x_i | 0 | 1 | 0…] over the augmented keys
(``kernel.augment``): one GEMM per tile of keys, a running top-k per query, memory
O(B·chunk + B·k), never O(M·N). The index of a dataset and outer plan is computed once
(O(M·N·D), not per σ) and cached under ``$LOSSFLOOR_CACHE/neighbours``, keyed by the data
fingerprint and the draws (M, seed, conditional) and k; a file that cannot be read or does not
match is rebuilt, never trusted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lossfloor.optimal.cache import cache_path, read_arrays, write_arrays
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES, keys_per_tile
from lossfloor.optimal.pools import Pool

Tensor = torch.Tensor

#: Part of every key: bumped when the index of the same key would change.
INDEX_FORMAT = "lossfloor-neighbours/2"

#: Queries ranked at once.
QUERY_BLOCK = 1024

#: Indexes of less work than this (sources × points × dims) are computed, not cached: they
#: take less time than the file.
CACHE_MIN_WORK = 2**30


def nearest_neighbours(pool: Pool, rows: Tensor, k: int, tile_bytes: int = DEFAULT_TILE_BYTES):
    """For each point ``rows[i]`` of the pool: itself, then its k nearest other points by
    ‖x_i − x_j‖², nearest first, equal distances in index order (len(rows)×(k+1), int64),
    k < N. The order is therefore the same for every k; for another tile size, or a sharded
    pool (each process ranks its rows, then the processes' lists are merged), it is the same
    except between points at distances equal but for the last bit of their scores, which the
    GEMM's blocking (the tile's shape) decides."""
    d = pool.dim
    table = torch.empty(rows.numel(), k + 1, dtype=torch.long)
    for lo in range(0, rows.numel(), QUERY_BLOCK):
        r = rows[lo : lo + QUERY_BLOCK].to(pool.device)
        q = torch.zeros(r.numel(), pool.width, dtype=pool.dtype, device=pool.device)
        q[:, :d] = pool.rows(r)[0]
        q[:, d + 1] = 1.0
        best_s = torch.full((r.numel(), 0), -torch.inf, dtype=q.dtype, device=q.device)
        best_i = torch.empty((r.numel(), 0), dtype=torch.long, device=q.device)
        step = keys_per_tile(r.numel(), q.element_size(), tile_bytes)
        for keys, key_ids, _ in pool.key_chunks(step):  # the pool's rows (read per chunk)
            for start in range(0, keys.shape[0], step):
                scores = q @ keys[start : start + step].T  # B×chunk: s_ij
                ids = key_ids[start : start + step].to(q.device)
                scores.masked_fill_(ids[None, :] == r[:, None], -torch.inf)  # not itself
                vals, pos = _top_in_index_order(scores, k)
                best_s, best_i = _merge(
                    torch.cat([best_s, vals], 1), torch.cat([best_i, ids[pos]], 1), k
                )
        if pool.shards > 1:  # a shard may hold fewer than k points: pad, then merge
            pad = k - best_s.shape[1]
            best_s = torch.nn.functional.pad(best_s, (0, pad), value=-torch.inf)
            best_i = torch.nn.functional.pad(best_i, (0, pad), value=-1)
            best_s, best_i = _merge(pool.across(best_s), pool.across(best_i), k)
        table[lo : lo + r.numel(), 0] = r.cpu()
        table[lo : lo + r.numel(), 1:] = best_i.cpu()
    return table


def _top_in_index_order(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest scores per row (values, column positions), where a tie at the k-th place
    keeps the lowest columns: rows with such a tie are sorted stably (rare)."""
    c = scores.shape[1]
    top = scores.topk(min(k + 1, c), dim=1)
    vals, pos = top.values, top.indices
    if c > k:
        tied = torch.nonzero(vals[:, k - 1] == vals[:, k]).flatten()
        if tied.numel():
            again = scores[tied].sort(dim=1, descending=True, stable=True)
            vals[tied], pos[tied] = again.values[:, : k + 1], again.indices[:, : k + 1]
    return vals[:, :k], pos[:, :k]


def _merge(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (score descending, index ascending) of candidate scores and ids per row."""
    order = ids.argsort(dim=1)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    best = scores.sort(dim=1, descending=True, stable=True)
    return best.values[:, :k], ids.gather(1, best.indices[:, :k])


def neighbour_tables(
    plan: OuterPlan, pools: list[Pool], k: int, tile_bytes: int = DEFAULT_TILE_BYTES
) -> list[Tensor]:
    """Per pool (the whole set, or each class): an n×(k+1) table whose row i is i and its k
    nearest neighbours where point i is a source of the plan's draws, −1 elsewhere; from the
    cache where it holds this key, else computed and stored (where the work exceeds
    CACHE_MIN_WORK). k is capped at n − 1 per pool."""
    key = index_key(plan, k, pools[0].dtype)
    path = cache_path(key, "neighbours")
    rows = [_source_rows(plan, g) for g in range(len(plan.groups))]
    caps = [min(k, p.n - 1) for p in pools]
    work = sum(r.numel() * p.n * p.dim for r, p in zip(rows, pools, strict=True))
    cached = work >= CACHE_MIN_WORK and pools[0].shards == 1  # sharded: computed, not cached
    hit = _read(path, key, rows, [p.n for p in pools], caps) if cached else None
    if hit is not None:
        return hit
    tables = []
    for pool, r, kk in zip(pools, rows, caps, strict=True):
        table = torch.full((pool.n, kk + 1), -1, dtype=torch.long)
        table[r] = nearest_neighbours(pool, r, kk, tile_bytes)
        tables.append(table)
    if cached:
        write_arrays(path, key, {f"group{g}": t.numpy() for g, t in enumerate(tables)})
    return tables


def index_key(plan: OuterPlan, k: int, dtype: torch.dtype) -> dict[str, Any]:
    """Everything the index depends on, as JSON: the data (and class partition), the draws'
    sources (M, seed, conditional), k and the dtype of the distances."""
    return {
        "format": INDEX_FORMAT,
        "data": plan.fingerprint,
        "outer": plan.outer,
        "seed": plan.seed,
        "conditional": plan.conditional,
        "k": int(k),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _source_rows(plan: OuterPlan, group: int) -> Tensor:
    """The pool indices (sorted, unique) of the plan's sources in ``group``."""
    local = plan.groups[group][1][plan.sources]
    return torch.unique(local[local >= 0])


def _read(path, key, rows: list[Tensor], sizes: list[int], caps: list[int]) -> list[Tensor] | None:
    """The stored tables if ``path`` holds exactly ``key`` with tables of the right shape whose
    source rows start with their own index, hold valid distinct indices, and whose other rows
    are −1; None otherwise (missing, truncated, foreign or altered)."""
    arrays = read_arrays(path, key, [f"group{g}" for g in range(len(rows))])
    if arrays is None:
        return None
    tables = []
    for arr, r, n, kk in zip(arrays, rows, sizes, caps, strict=True):
        if arr.dtype != np.int64 or arr.shape != (n, kk + 1):
            return None
        t = torch.from_numpy(arr)
        src = torch.zeros(n, dtype=torch.bool)
        src[r] = True
        body = t[src]
        if not (
            bool((t[~src] == -1).all())
            and bool((body[:, 0] == r).all())
            and bool(((body >= 0) & (body < n)).all())
            and bool((body.sort(dim=1).values.diff(dim=1) != 0).all())
        ):
            return None
        tables.append(t)
    return tables
