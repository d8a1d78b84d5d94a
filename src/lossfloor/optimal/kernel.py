"""The one hot kernel: the posterior mean of noisy queries over a set of data points.

For VE noise σ and keys x_n (equally weighted), the posterior over keys given a query q is

    p(n | q) ∝ exp(−‖q − x_n‖² / 2σ²) ∝ exp(⟨q, x_n⟩/σ² − ‖x_n‖²/2σ²),

(‖q‖² is the same for every key of a query and cancels), and μ(q) = Σ_n p(n|q)·x_n. The logits are
one GEMM and the weighted sum a second; keys are streamed in chunks with a running max per query
(online log-sum-exp), so memory is O(B·chunk + B·D), never O(B·N). ``posterior_mean`` returns
μ(q); ``accumulate_softmax`` returns the running ``SoftmaxState``, which further keys can extend.

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
    """Running per-query (reference logit m, z = Σ exp(l − m), acc = Σ exp(l − m)·x).

    m is the running max (every weight exp(l − m) ≤ 1; ``accumulate_softmax`` sets it to the
    largest logit's own value, so that key weighs exactly 1); μ = acc/z, log Σ exp(l) = m + log z.
    """

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

    def add_batched(self, logits: Tensor, values: Tensor) -> None:
        """Add keys of each query's own: logits B×n, values B×n×D. Consumes ``logits``."""
        m_safe = self._rescale(logits.amax(dim=1))
        p = _exp_(logits.sub_(m_safe[:, None]))
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


def rescaled(state: SoftmaxState, m: Tensor) -> SoftmaxState:
    """The state over the same keys with reference logit m ≥ state.m per query:
    (m, z·e^(state.m − m), acc·e^(state.m − m)). States of disjoint key sets with a common m
    add: z = Σ z_r, acc = Σ acc_r (a sharded softmax's exact merge, with m = max_r m_r); a query
    with no key anywhere (m = −inf) keeps z = 0."""
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    scale = torch.exp(state.m - m_safe)  # exp(−inf) = 0 where this state has no key
    return SoftmaxState(m=m, z=state.z * scale, acc=state.acc * scale[:, None])


def keys_per_tile(batch: int, itemsize: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """How many keys one tile holds so that the B×n logits stay within ``tile_bytes``."""
    return max(64, tile_bytes // (itemsize * max(batch, 1)))


#: Augmented rows are padded to a multiple of this many columns (unaligned widths such as
#: D + 2 = 786 made MKL's second GEMM ~1.5× slower).
ALIGN = 8


def augment(keys: Tensor) -> Tensor:
    """The keys as both GEMMs read them: [x | 1 | −‖x‖²/2 | 0…] (N×W, W = D+2 rounded up to
    a multiple of ALIGN).

    With queries written [q/σ², −s, 1/σ², 0…], one GEMM gives the shifted logits
    ⟨q,x⟩/σ² − ‖x‖²/2σ² − s, and the weights times the same matrix give [Σp·x | Σp | ·].
    """
    n, d = keys.shape
    out = torch.zeros(n, -(-(d + 2) // ALIGN) * ALIGN, dtype=keys.dtype, device=keys.device)
    out[:, :d] = keys
    out[:, d] = 1.0
    out[:, d + 1] = -0.5 * keys.pow(2).sum(dim=1)
    return out


def _exp_(logits: Tensor) -> Tensor:
    """exp in place, flushing results below the dtype's smallest normal number to 0.

    exp of a very negative logit is a subnormal number, which the CPU computes ~10× slower
    than a normal one; they are below the resolution of any sum here, so they become 0.
    """
    floor = math.log(torch.finfo(logits.dtype).tiny)
    return torch.threshold_(logits, floor, -math.inf).exp_()


def _shift(state: SoftmaxState) -> Tensor:
    """The per-query shift s: the running max, 0 where no key has been seen yet."""
    return torch.where(torch.isfinite(state.m), state.m, torch.zeros_like(state.m))


def _exact_tile(state: SoftmaxState, shifted_t: Tensor, keys_aug: Tensor, rows: Tensor) -> None:
    """Fold a tile (logits transposed: keys × queries) into queries ``rows`` of the state with
    an explicit per-query max (the queries that have seen no key yet: s = 0, so each one's
    largest logit becomes exactly 0)."""
    d = state.acc.shape[1]
    s = _shift(state)[rows]
    m_new = torch.maximum(state.m[rows], s + shifted_t.amax(dim=0))
    finite = torch.isfinite(m_new)
    delta = torch.where(finite, m_new - s, torch.zeros_like(s))
    scale = torch.where(finite, torch.exp(state.m[rows] - m_new), torch.ones_like(s))
    t = _exp_(shifted_t.sub_(delta[None, :])).T @ keys_aug
    state.z[rows] = state.z[rows] * scale + t[:, d]
    state.acc[rows] = state.acc[rows] * scale[:, None] + t[:, :d]
    state.m[rows] = m_new


@dataclass
class Adjust:
    """Sparse additions to the logits of (key, query) pairs: key positions, query rows, values."""

    keys: Tensor
    queries: Tensor
    values: Tensor

    @classmethod
    def from_positions(cls, positions: Tensor, values: Tensor) -> Adjust:
        """From B×k key positions (−1: none) and their B×k values."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        hit = positions >= 0
        return cls(positions[hit], rows.expand_as(positions)[hit], values[hit])

    def tile(self, start: int, stop: int) -> Adjust:
        """The entries of keys [start, stop), with key positions relative to ``start``."""
        sel = (self.keys >= start) & (self.keys < stop)
        return Adjust(self.keys[sel] - start, self.queries[sel], self.values[sel])


def _logits_t(
    q_aug: Tensor,
    chunk: Tensor,
    ids: Tensor | None,
    exclude: Tensor | None,
    adjust: Adjust | None = None,
    buffer: Tensor | None = None,
) -> Tensor:
    """Shifted logits of a tile, transposed (keys × queries: MKL's faster orientation), with
    each query's excluded key (if any) at −inf and the tile's per-(key, query) ``adjust``
    added; written into ``buffer`` (≥ keys × queries elements) where given: a tile-sized
    allocation is mapped fresh page by page each time (the same GEMM, the same bits)."""
    if buffer is None:
        logits_t = chunk @ q_aug.T
    else:
        out = buffer[: chunk.shape[0] * q_aug.shape[0]].view(chunk.shape[0], q_aug.shape[0])
        logits_t = torch.mm(chunk, q_aug.T, out=out)
    if ids is not None and exclude is not None:
        logits_t.masked_fill_(ids[:, None] == exclude[None, :], -math.inf)
    if adjust is not None:
        logits_t.index_put_((adjust.keys, adjust.queries), adjust.values, accumulate=True)
    return logits_t


def _augmented(keys: Tensor | None, keys_aug: Tensor | None) -> Tensor:
    """``keys_aug`` where given, else ``augment(keys)``."""
    if keys_aug is not None:
        return keys_aug
    if keys is None:
        raise ValueError("accumulate_softmax needs keys or keys_aug")
    return augment(keys)


def accumulate_softmax(
    queries: Tensor,
    keys: Tensor | None,
    sigma: float,
    *,
    keys_aug: Tensor | None = None,
    key_ids: Tensor | None = None,
    exclude_ids: Tensor | None = None,
    key_logw: Tensor | None = None,
    adjust: Adjust | None = None,
    state: SoftmaxState | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> SoftmaxState:
    """Stream keys (N×D, or ``keys_aug`` = ``augment(keys)``) for ``queries`` (B×D) at VE σ into
    the softmax state (m, z = Σ exp(l − m), acc = Σ exp(l − m)·x) of the logits

        l_bn = ⟨q_b, x_n⟩/σ² − ‖x_n‖²/2σ² + log w_n + a_bn,   so that μ = acc/z = ``state.mean()``

    is the posterior mean with key weights w_n (``key_logw``, N; default 1) and per-pair
    additions a_bn (``adjust``: sparse, key positions and query rows; default 0). log w_n is
    folded into the keys' −‖x‖²/2 column as σ²·log w_n (a copy of the keys), so it costs no pass
    over the logits; its rounding error in a logit is ~ε·|log w_n|.

    Per tile: one GEMM gives the logits shifted by each query's running max; a max pass; one
    exp pass; one GEMM gives [Σp·x | Σp]. Where a query's tile holds a logit above its running
    max, the max is raised to it exactly (``_raise_max``), so each query's largest logit weighs
    exactly 1 whichever tile (or chunk, or process) holds it: μ of a query whose posterior is
    one key is that key's x to the last bit, plus the others' terms with their own rounding,
    for any tiling (with the max left lagging, that key weighed a rounded e^Δ and μ = acc/z was
    off by an ulp: a floor of ~(u·x)² under J*, issue 27). Pass ``state`` to continue.
    With ``key_ids`` (N) and ``exclude_ids`` (B), key n is masked for query b where
    key_ids[n] == exclude_ids[b].
    """
    b, d = queries.shape
    keys_aug = _augmented(keys, keys_aug)
    if key_logw is not None:
        keys_aug = keys_aug.clone()
        keys_aug[:, d + 1] += (sigma * sigma) * key_logw.to(keys_aug.dtype)
    if state is None:
        state = SoftmaxState.empty(b, d, queries.dtype, queries.device)
    inv_var = 1.0 / (sigma * sigma)
    q_aug = torch.zeros(b, keys_aug.shape[1], dtype=queries.dtype, device=queries.device)
    torch.mul(queries, inv_var, out=q_aug[:, :d])
    q_aug[:, d + 1] = inv_var
    return accumulate_keys(
        q_aug, keys_aug, keys_aug, d, state, key_ids=key_ids, exclude_ids=exclude_ids,
        adjust=adjust, tile_bytes=tile_bytes,
    )  # fmt: skip


def accumulate_keys(
    q_aug: Tensor,
    logit_keys: Tensor,
    value_keys: Tensor,
    shift_col: int,
    state: SoftmaxState,
    *,
    key_ids: Tensor | None = None,
    exclude_ids: Tensor | None = None,
    adjust: Adjust | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> SoftmaxState:
    """The loop of ``accumulate_softmax`` for any keys: logits l_bn = ⟨q_aug_b, logit_keys_n⟩
    (queries B×W, keys N×W; column ``shift_col`` of the keys is 1 and that of the queries is
    overwritten by −(running max) per tile), values ``value_keys`` (N×(V+1…): V = the width of
    ``state.acc``, column V is 1: the normaliser z). The point kernel passes the same ``augment``
    keys for both (V = D, ``shift_col`` = D); a mixture pool its per-σ keys (``mixture.py``).
    Exclusion, ``adjust``, exact max raising and tiles as ``accumulate_softmax``'s."""
    step = keys_per_tile(q_aug.shape[0], q_aug.element_size(), tile_bytes)
    buffer = q_aug.new_empty(min(step, logit_keys.shape[0]) * q_aug.shape[0])  # every tile's
    for start in range(0, logit_keys.shape[0], step):
        chunk = logit_keys[start : start + step]
        values = chunk if value_keys is logit_keys else value_keys[start : start + step]
        ids = None if key_ids is None else key_ids[start : start + step]
        adj = None if adjust is None else adjust.tile(start, start + chunk.shape[0])
        q_aug[:, shift_col] = -_shift(state)
        logits_t = _logits_t(q_aug, chunk, ids, exclude_ids, adj, buffer)
        if _fold_fresh_queries(state, logits_t, values):
            continue
        _raise_max(state, logits_t)
        t = _exp_(logits_t).T @ values
        v = state.acc.shape[1]
        state.z.add_(t[:, v])
        state.acc.add_(t[:, :v])
    return state


def posterior_mean(
    queries: Tensor,
    keys: Tensor | None,
    sigma: float,
    *,
    keys_aug: Tensor | None = None,
    key_ids: Tensor | None = None,
    exclude_ids: Tensor | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Tensor:
    """μ(q) = Σ_n softmax_n(⟨q, x_n⟩/σ² − ‖x_n‖²/2σ²)·x_n for each query (B×D) over the keys:
    the optimal denoiser of the empirical set ``keys`` at VE σ (``accumulate_softmax``'s mean)."""
    return accumulate_softmax(
        queries,
        keys,
        sigma,
        keys_aug=keys_aug,
        key_ids=key_ids,
        exclude_ids=exclude_ids,
        tile_bytes=tile_bytes,
    ).mean()


def _fold_fresh_queries(state: SoftmaxState, logits_t: Tensor, keys_aug: Tensor) -> bool:
    """Fold the tile exactly (explicit max) into the queries that have seen no key yet, and
    drop them from ``logits_t``; True when that was every query (the tile is done)."""
    fresh = ~torch.isfinite(state.m)
    if bool(fresh.all()):
        rows = torch.arange(fresh.numel(), device=fresh.device)
        _exact_tile(state, logits_t, keys_aug, rows)
        return True
    if bool(fresh.any()):
        rows = torch.nonzero(fresh).flatten()
        _exact_tile(state, logits_t[:, rows], keys_aug, rows)
        logits_t[:, rows] = -math.inf
    return False


def _raise_max(state: SoftmaxState, logits_t: Tensor) -> None:
    """Where a query's logits in this tile (shifted by its running max m) reach above 0,
    raise m to the tile's largest logit λ exactly: subtract λ from that query's shifted logits
    (its largest becomes 0, whose weight is exactly 1) and scale z and acc by e^−λ."""
    lift = logits_t.amax(dim=0)
    rows = torch.nonzero(lift > 0).flatten()
    if rows.numel() == 0:
        return
    logits_t.sub_(lift.clamp_(min=0)[None, :])  # one pass; x − 0 = x for the others
    lift = lift[rows]
    scale = torch.exp(-lift)
    state.z[rows] = state.z[rows] * scale
    state.acc[rows] = state.acc[rows] * scale[:, None]
    state.m[rows] = state.m[rows] + lift


def logit_error_bound(max_sq_norm: float, dim: int, sigma: float, dtype: torch.dtype) -> float:
    """A bound on the rounding error of one logit ⟨q,x⟩/σ² − ‖x‖²/2σ² in ``dtype``.

    δ ≈ u·(√D·‖q‖‖x‖ + ‖x‖²)/σ² with u the unit round-off, ‖q‖² ≤ R² + Dσ² (a typical noisy
    query) and ‖x‖² ≤ R². A relative error δ of the unnormalised weights moves μ by ≲ δ·spread.
    """
    u = torch.finfo(dtype).eps / 2
    r2 = max_sq_norm
    q = math.sqrt(r2 + dim * sigma * sigma)
    return u * (math.sqrt(dim) * q * math.sqrt(r2) + r2) / (sigma * sigma)
