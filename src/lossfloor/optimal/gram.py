"""The ``gram`` estimator: the exact posterior weights of every σ of a grid from two Gram
products shared by the grid; the source's term exactly and the rest from a weight-proportional
sample (docs/benchmarks.md, issue 8).

For an outer draw x_t = x0 + σε (x0 = x_s, centred data) the kernel's logits are

    l_n(σ) = (x_t·x_n − ‖x_n‖²/2)/σ² = (g_n + σ·e_n − ‖x_n‖²/2)/σ²,   g = x0·X^T, e = ε·X^T,

so the two products g and e (one GEMM each, B×N×D) serve every σ of the grid, and each σ costs
only elementwise passes over B×N: the weights w = softmax(l) are exact, normaliser included.
Split the posterior into the source s (weight w_s) and the rest R (mass m_R = 1 − w_s), and
draw L = ``inner`` points j ~ w_n/m_R from R (iid, by inverting the cumulative weights, ``_split``):

    μ = w_s·x0 + m_R·E_R[x],   δ = μ − x0 = m_R·E_R[u],   u_n = x_n − x0 (u_s = 0),

    ‖μ‖² ≈ w_s²‖x0‖² + 2·w_s·m_R·x0·x̄ + m_R²·(‖Σ_j x_j‖² − Σ_j ‖x_j‖²)/(L(L−1)),
    ‖δ‖² ≈ m_R²·(‖Σ_j u_j‖² − Σ_j ‖u_j‖²)/(L(L−1)),

the last terms the U-statistics of ‖E_R[x]‖² and ‖E_R[u]‖². Then closed = (A − ‖μ‖²)/D and
direct = ‖δ‖²/D are unbiased per draw: no ratio bias (the normaliser is exact), no truncation
(R is sampled, not dropped); their sampling variance is O(m_R²/L), on top of the outer draws'.
Where the posterior sits on the source (small σ) m_R → 0 and the values are full's; where a
few points share it (the rare draws that carry J* below σ*) the draws find them in proportion.

Cost per σ: four passes over B×N (the logits relative to the source's, their scale and clamp,
exp2) and the block totals for the draws, instead of ``full``'s two GEMMs, plus L gathered rows
per draw (``fused=True``, ``--fused``: one compiled pass over each block of columns for every σ
of the grid, writing only block totals, and one over the draws' rows: ``fused.py``, equal to
these passes up to rounding); the two products are computed once per block of draws for the
whole grid (``grid_values``; tilted draws add the products of the chosen neighbours'
differences to the sources, once per pair for the grid). A single σ (``__call__``: where no
sweep runs, e.g. tilted draws on several processes) computes them for that σ alone, at about
``full``'s cost, and gives the same values bitwise.

Sharded (K processes, ``shard.ShardedPool``): each process multiplies by its own rows (its
columns of g and e) and computes its columns' weights relative to the source's logit, which is
global (the source's column comes from the process that holds it); so each process's sums of its
columns add exactly, and the rest's mass is Σ_k m_k. The draws invert the same cumulative
weights, in the same global column order, with the same uniforms u as one process: a process k
first, where u·Σ_k m_k falls among the K processes' masses (all-gathered), then a column within
k's block totals (``_shard_split``); the picked rows' means and norms are all-reduced
(``Pool.bags``). In exact arithmetic these are one process's draws; in floating point a uniform
that falls within the rounding of a cumulative sum at a column's edge picks its neighbour (the
sums run in another order): in float64 the chance per draw is ~N·10⁻¹⁶ and the numbers are one
process's to rounding; in float32 ~N·10⁻⁷ (tens of the L·M draws of a σ at N = 10⁴), another
draw from the same weights, which moves J* by far less than its standard error
(docs/distributed.md: 3·10⁻³ of it on 10,000 Fashion-MNIST images).
Streamed (``stream.StreamedPool``): the products read this process's rows in chunks; the rest's
draws are read by index. Memory per block: the two products, 2·B·N_k·itemsize bytes for B =
GRAM_ROWS draws and the N_k = N/K columns of this process (fewer draws per product where that
exceeds PRODUCT_SHARE of the memory available: ``_rows_per_product``), plus one chunk when
streamed; never N×D when streamed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.capabilities import PLACES, Capabilities
from lossfloor.optimal.estimators import ESTIMATORS, Estimator, PerSample
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.pools import Pool

Tensor = torch.Tensor

#: Draws per Gram product (its GEMM); columns per block of the two-level draws (``_split``);
#: the largest exponent of a weight relative to the source's (``_weights``).
GRAM_ROWS = 256
SAMPLE_BLOCK = 256
HIGH_EXPONENT = 100.0
#: The fused pass makes no draws of a rest whose share of the posterior is at most this, and
#: its U-statistics leave its terms out.
NEGLIGIBLE_MASS = 2.0**-64
#: The share of the memory available that the two products of a block of draws may take;
#: products of up to SMALL_PRODUCTS bytes are made without asking.
PRODUCT_SHARE = 0.5
SMALL_PRODUCTS = 2**28
#: torch's thread count outside the outermost ``small_ops`` (innermost last; empty outside).
_GEMM_THREADS: list[int] = []


@contextmanager
def small_ops() -> Iterator[None]:
    """Run the enclosed torch ops in one thread, the two Gram products of a block of draws
    excepted (``_threaded``: torch's count on entry to the outermost ``small_ops``). A sweep's
    other ops are small (16 draws × N per pass, or the tilted draws' products of ≤ 16·K rows,
    each its own parallel region): in threads they stall whenever one thread is descheduled
    (beside a busy process: docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    _GEMM_THREADS.append(_GEMM_THREADS[-1] if _GEMM_THREADS else threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _GEMM_THREADS.pop()
        torch.set_num_threads(threads)


ProductsFn = Callable[..., tuple[Tensor, Tensor]]


def _threaded(products: ProductsFn, width: int) -> ProductsFn:
    """``products`` (a GEMM: B×``width``) in the threads torch had outside ``small_ops``, into
    one buffer reused from call to call (a call's result is the caller's until its next)."""
    buffer: list[Tensor] = []

    def call(rows: Tensor) -> tuple[Tensor, Tensor]:
        if not buffer or buffer[0].numel() < rows.shape[0] * width:
            buffer[:] = [rows.new_empty(rows.shape[0] * width)]
        out = buffer[0][: rows.shape[0] * width].view(rows.shape[0], width)
        if not _GEMM_THREADS:
            return products(rows, out=out)
        torch.set_num_threads(_GEMM_THREADS[-1])
        try:
            return products(rows, out=out)
        finally:
            torch.set_num_threads(1)

    return call


def _weights(logits: Tensor, scale: float, n: int) -> Tensor:
    """exp(scale·l) per row, in place, as 2^(scale·log₂e·l) (exp2 is the faster kernel), for
    logits l relative to a reference (the source's, or the row's largest); the padding columns
    from n on are 0. Exponents are clamped to [log₂(tiny) + 1, HIGH_EXPONENT]: weights under
    2·tiny (2^{−125} of the reference in float32) would be subnormal (exp's slow path) and
    together weigh ≤ 2·N·tiny; a row whose weights reach 2^HIGH_EXPONENT is recomputed relative
    to its largest logit (``_source_split``)."""
    floor = math.log2(torch.finfo(logits.dtype).tiny) + 1.0
    w = logits.mul_(scale * math.log2(math.e)).clamp_(min=floor, max=HIGH_EXPONENT).exp2_()
    w[:, n:] = 0.0
    return w


@ESTIMATORS.register("gram")
@dataclass(frozen=True, kw_only=True)
class Gram(Estimator):
    """Exact weights from shared Gram products; the source exactly and ``inner``
    weight-proportional draws of the rest (module docstring). ``rows`` draws per elementwise
    pass (a cache-sized B×N)."""

    name: ClassVar[str] = "gram"
    capabilities: ClassVar[Capabilities] = Capabilities(
        runs_on=frozenset(PLACES),
        default_draws="tilted",
        default_form="combined",
        options=frozenset({"inner", "fused"}),
        sweeps_grid=True,
        why_not={
            "gaussian": "its two σ-free Gram products give the point logits of every σ; a "
            "component's logits weigh x by 1/(s² + σ²) per element, so they change with σ",
        },
    )
    inner: int = 32
    rows: int = 16
    fused: bool = False

    def __post_init__(self) -> None:
        if not self.inner >= 2:
            raise ParameterError("inner", self.inner, "the sample of the rest needs ≥ 2 draws")
        if not self.rows >= 1:
            raise ParameterError("rows", self.rows, "must be ≥ 1")

    def to_config(self) -> dict[str, Any]:
        config = {"name": self.name, "inner": self.inner, "rows": self.rows}
        return config | ({"fused": True} if self.fused else {})  # older records: no key

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        """μ̂ = w_s·x_s + m_R·(the mean of the L draws from R): unbiased for μ."""
        n = pool.n_held
        width = _padded(n)
        products = pool.products()
        shared = pool if pool.shards > 1 else None
        out = []
        for lo in range(0, queries.shape[0], self.rows):
            q = queries[lo : lo + self.rows]
            prod, half_sq = products(q)
            logits = F.pad(prod - half_sq, (0, width - n), value=-math.inf)
            logits.sub_(_row_max(logits, shared))
            draws = 1.0 - torch.rand(q.shape[0], self.inner, generator=generator)
            src = sources[lo : lo + self.rows]
            w = _weights(logits, 1.0 / (sigma * sigma), n)
            own, rest, pick = _splitter(shared)(w, src, draws.to(q.device, w.dtype))
            mean = pool.mean_rows(pick)
            x_s = pool.rows(src)[0]
            out.append((own[:, None] * x_s + rest[:, None] * mean) / (own + rest)[:, None])
        return torch.cat(out)

    def __call__(
        self, pool, sources, noise, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES, component=None
    ):
        return self.grid_values(pool, sources, noise, [sigma], [generator])[0]

    def grid_values(
        self,
        pool: Pool,
        sources: Tensor,
        noise: Tensor,
        sigmas: Sequence[float],
        generators: Sequence[torch.Generator],
        toward: Sequence[Tensor] | None = None,
    ) -> list[PerSample]:
        """Per-sample values at each σ of ``sigmas`` for x_t = x0[sources] + σ·noise, from one
        pair of Gram products per GRAM_ROWS draws (``_rows_per_product``); ``generators[i]``
        draws σ_i's samples. On a sharded pool every process returns the same values.
        ``toward`` (tilted draws, ``draws.tilt_toward``): σ_i's noise is noise + (x_c − x_s)/2σ_i
        with c = toward[i][b] (−1: none), so ε·Xᵀ = e + (x_c − x_s)·Xᵀ/2σ_i: the products of
        the differences to the sources of the chosen neighbours, once per (c, s) for the grid
        (``_tilt_products``)."""
        with small_ops():
            return self._grid_values(pool, sources, noise, sigmas, generators, toward)

    def _grid_values(
        self,
        pool: Pool,
        sources: Tensor,
        noise: Tensor,
        sigmas: Sequence[float],
        generators: Sequence[torch.Generator],
        toward: Sequence[Tensor] | None,
    ) -> list[PerSample]:
        """``grid_values`` in one thread (``small_ops``)."""
        b = noise.shape[0]
        draws = torch.stack([1.0 - torch.rand(b, self.inner, generator=g) for g in generators]).to(
            noise.device, noise.dtype
        )  # S×B×L
        closed = torch.empty(len(sigmas), b, dtype=torch.float64, device=noise.device)
        direct = torch.empty_like(closed)
        n = pool.n_held  # this process's columns
        # padding: products 0, logits −∞ (the torch passes' blocks; the fused pass needs none)
        width = n if self.fused else _padded(n)
        raw = pool.products(width - n)
        products = _threaded(raw, width)  # the tilted products (small GEMMs) in one thread
        shared = pool if pool.shards > 1 else None
        step = _rows_per_product(pool, noise.element_size(), self.rows)
        for lo in range(0, b, step):
            x0, sq0 = pool.rows(sources[lo : lo + step])
            both, half_sq = products(torch.cat([x0, noise[lo : lo + step]]))  # g and e: one GEMM
            a_all, e_all = both[: x0.shape[0]].sub_(half_sq), both[x0.shape[0] :]
            for s0 in range(0, x0.shape[0], self.rows):
                at = slice(lo + s0, lo + s0 + self.rows)
                src = sources[at]
                a, e = a_all[s0 : s0 + self.rows], e_all[s0 : s0 + self.rows]
                shift = None
                if toward is not None:
                    shift = _tilt_products(pool, raw, [t[at] for t in toward], src)
                split = _fused_split if self.fused else _torch_split
                own, rest, pick = split(a, e, n, src, sigmas, draws[:, at], shift, shared)
                x, sq = x0[s0 : s0 + self.rows], sq0[s0 : s0 + self.rows]
                if self.fused:
                    forms = _fused_forms(pool, own, rest, pick, src, sq)
                else:
                    forms = self._forms(pool, own, rest, pick, x, sq)
                closed[:, at], direct[:, at] = forms
        d = pool.dim
        return [
            PerSample(closed=c / d, direct=dd / d) for c, dd in zip(closed, direct, strict=True)
        ]

    def _forms(
        self, pool: Pool, own: Tensor, rest: Tensor, pick: Tensor, x0: Tensor, sq0: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(A − ‖μ‖², ‖x0 − μ‖²) (float64, S×B) from the source's and the rest's unnormalised
        weights (S×B), the draws from the rest (S×B×L) and the sources x0 (B×D): the module
        docstring's estimates, ‖μ‖² from x_j and ‖δ‖² from u_j = x_j − x0 (U-statistics)."""
        total = (own + rest).double()
        w_s, m = own.double() / total, rest.double() / total
        big = pick.shape[-1]
        x_bar, x_norms = pool.bags(pick.reshape(-1, big))
        x_bar = x_bar.double().view(*pick.shape[:2], -1)  # S×B×D
        x_sq = x_norms.view(pick.shape).double().sum(dim=-1)  # Σ_j ‖x_j‖²
        sq0 = sq0.double()
        x0_bar = (x_bar * x0.double()).sum(dim=-1)
        bar_sq = x_bar.pow(2).sum(dim=-1)
        u_sq = x_sq - 2.0 * big * x0_bar + big * sq0  # Σ_j ‖x_j − x0‖²
        pairs = big * (big - 1)
        pairs_x = (big * big * bar_sq - x_sq) / pairs
        pairs_u = (big * big * (bar_sq - 2.0 * x0_bar + sq0) - u_sq) / pairs
        return _closed_direct(pool.a, w_s, m, sq0, x0_bar, pairs_x, pairs_u)


def _closed_direct(
    a: float, w_s: Tensor, m: Tensor, sq0: Tensor, x0_bar: Tensor, pairs_x: Tensor, pairs_u: Tensor
) -> tuple[Tensor, Tensor]:
    """(A − ‖μ‖², ‖δ‖²) from the source's weight w_s, the rest's mass m, ‖x0‖², x0·(the
    draws' mean) and the U-statistics of ‖E_R[x]‖² and ‖E_R[u]‖² (the module docstring):
    ‖μ‖² = w_s²‖x0‖² + 2·w_s·m·x0·x̄ + m²·pairs_x, ‖δ‖² = m²·pairs_u."""
    mu_sq = w_s.pow(2) * sq0 + 2.0 * m * w_s * x0_bar + m.pow(2) * pairs_x
    return a - mu_sq, m.pow(2) * pairs_u


def _fused_forms(
    pool: Pool, own: Tensor, rest: Tensor, pick: Tensor, src: Tensor, sq0: Tensor
) -> tuple[Tensor, Tensor]:
    """``Gram._forms`` from the draws' sums in one pass over their rows (``Pool.bag_moments``,
    in torch's threads outside ``small_ops``): pairs_x = (‖Σx_j‖² − Σ‖x_j‖²)/L(L−1), pairs_u
    likewise of u_j = x_j − x0, the differences taken before squaring."""
    s, b, big = pick.shape
    total = own + rest
    # where the rest's share is at most NEGLIGIBLE_MASS (at small σ, most draws) no draws were
    # made (−1, ``_fused_split``) and its terms (≤ 2m·max‖x‖², 1e-19 of it) are left out
    moments = torch.zeros(s * b, 5, dtype=torch.float64, device=pick.device)
    need = (pick[..., 0] >= 0).flatten()
    if bool(need.any()):
        idx, centres = pick.reshape(-1, big)[need], src.repeat(s)[need]
        moments[need] = pool.bag_moments(idx, centres, _gemm_threads())
    x_sq, dot, sum_sq, u_sq, u_sum_sq = moments.view(s, b, 5).unbind(dim=-1)
    pairs = big * (big - 1)
    return _closed_direct(
        pool.a, own / total, rest / total, sq0.double(), dot / big,
        (sum_sq - x_sq) / pairs, (u_sum_sq - u_sq) / pairs,
    )  # fmt: skip


def _gemm_threads() -> int:
    """torch's thread count outside ``small_ops`` (the GEMMs'): the fused kernels' threads."""
    return _GEMM_THREADS[-1] if _GEMM_THREADS else torch.get_num_threads()


def _torch_split(
    a: Tensor,
    e: Tensor,
    n: int,
    src: Tensor,
    sigmas: Sequence[float],
    draws: Tensor,
    shift: tuple[Tensor, Tensor] | None,
    shared: Pool | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(own, rest, pick), each stacked over the σ (S×B, S×B, S×B×L): ``_source_split`` of each
    σ from the products a = x0·Xᵀ − ½‖X‖² and e = ε·Xᵀ relative to the source's column
    (l_n − l_s = (a_n − a_s) + σ·(e_n − e_s)), tilted by ``shift`` (``_tilt_products``)."""
    a_s, e_s = _at_sources([a, e], src, shared)
    a, e = a - a_s, e - e_s
    buf = torch.empty_like(a)
    parts = [
        _source_split(
            a,
            e if shift is None else _tilted(e, *shift, i, sigma, src, shared),
            sigma,
            n,
            src,
            draws[i],
            buf,
            shared,
        )  # fmt: skip
        for i, sigma in enumerate(sigmas)
    ]
    own, rest, pick = (torch.stack(p) for p in zip(*parts, strict=True))
    return own, rest, pick


def _fused_split(
    a: Tensor,
    e: Tensor,
    n: int,
    src: Tensor,
    sigmas: Sequence[float],
    draws: Tensor,
    shift: tuple[Tensor, Tensor] | None,
    shared: Pool | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``_torch_split`` in one compiled pass over the products for every σ (``fused``, in
    torch's threads outside ``small_ops``); the rows where some weight reached
    2^HIGH_EXPONENT are redone by ``_torch_split`` (relative to their largest logit)."""
    from lossfloor.optimal import fused

    if shared is not None:
        raise UserError("--fused runs in one process: leave it out under torchrun")
    if a.device.type != "cpu":
        raise UserError(f"--fused runs on the CPU, not on {a.device.type}: leave it out")
    floor = math.log2(torch.finfo(a.dtype).tiny) + 1.0
    own, rest, pick = fused.source_split(
        a, e, n, src, sigmas, draws, shift, floor, HIGH_EXPONENT, NEGLIGIBLE_MASS, _gemm_threads()
    )
    redo = rest >= 2.0**HIGH_EXPONENT
    pad = (0, _padded(n) - n)  # the torch passes' blocks: padding logits −∞, products 0
    for i in torch.nonzero(redo.any(dim=1)).flatten().tolist():
        rows = torch.nonzero(redo[i]).flatten()
        tilted = None if shift is None else (F.pad(shift[0][:, :n], pad), shift[1][i : i + 1, rows])
        part = _torch_split(
            F.pad(a[rows, :n], pad, value=-math.inf), F.pad(e[rows, :n], pad), n, src[rows],
            sigmas[i : i + 1], draws[i : i + 1, rows], tilted, None,
        )  # fmt: skip
        for whole, redone in zip((own, rest, pick), part, strict=True):
            whole[i, rows] = redone[0].to(whole.dtype)
    return own, rest, pick


def _source_split(
    a: Tensor,
    e: Tensor,
    sigma: float,
    n: int,
    src: Tensor,
    draws: Tensor,
    buf: Tensor,
    shared: Pool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``_split`` of the weights at σ from the logits relative to the source's, (a + σ·e)/σ²
    (written into ``buf``); rows where some weight reached 2^HIGH_EXPONENT (a point far more
    probable than the source) are redone relative to their largest logit. ``shared``: the
    sharded pool whose processes hold the other columns (``_shard_split``)."""
    split = _splitter(shared)
    own, rest, pick = split(
        _weights(torch.add(a, e, alpha=sigma, out=buf), sigma**-2, n), src, draws
    )
    redo = torch.nonzero(rest >= 2.0**HIGH_EXPONENT).flatten()  # rest is global: the same rows
    if redo.numel():
        logits = torch.add(a[redo], e[redo], alpha=sigma)
        logits.sub_(_row_max(logits, shared))
        parts = split(_weights(logits, sigma**-2, n), src[redo], draws[redo])
        for whole, part in zip((own, rest, pick), parts, strict=True):
            whole[redo] = part
    return own, rest, pick


def _tilt_products(
    pool: Pool,
    products: ProductsFn,
    toward: Sequence[Tensor],
    src: Tensor,
) -> tuple[Tensor, Tensor]:
    """((x_c − x_s)·Xᵀ for each distinct pair (c, s) that ``toward`` (per σ, per draw: c or
    −1) names with the draws' sources ``src``: U×width; and each σ's and draw's row of it, −1
    where the draw is plain: S×B). At most min(B·K, S·B) rows: the cheaper of the neighbours'
    rows shared by the grid and each σ's chosen rows."""
    chosen = torch.stack(list(toward))  # S×B
    shifted = chosen >= 0
    pair = chosen * pool.n + src[None, :]
    distinct, where = torch.unique(pair[shifted], return_inverse=True)
    row = torch.full_like(chosen, -1)
    row[shifted] = where
    diff = pool.rows(distinct // pool.n)[0] - pool.rows(distinct % pool.n)[0]
    return products(diff)[0], row


def _tilted(
    e: Tensor,
    products: Tensor,
    row: Tensor,
    i: int,
    sigma: float,
    src: Tensor,
    shared: Pool | None,
) -> Tensor:
    """σ_i's tilted ε·Xᵀ relative to the source's column: e + (x_c − x_s)·Xᵀ/2σ on the shifted
    draws (``_tilt_products``), minus its value at the source (``_at_sources``)."""
    shifted = torch.nonzero(row[i] >= 0).flatten()
    if shifted.numel() == 0:
        return e
    out = e.index_add(0, shifted, products[row[i, shifted]], alpha=1.0 / (2.0 * sigma))
    return out.sub_(_at_sources([out], src, shared)[0])


def _padded(n: int) -> int:
    """N rounded up to whole blocks of SAMPLE_BLOCK columns (the two-level draws); one block
    at least (a process that holds no row: its columns weigh 0)."""
    return max(1, -(-n // SAMPLE_BLOCK)) * SAMPLE_BLOCK


def _rows_per_product(pool: Pool, itemsize: int, rows: int) -> int:
    """Draws per pair of products: GRAM_ROWS, or the most (a multiple of ``rows``) whose two
    products with this process's columns, 2·draws·columns·itemsize bytes, take at most
    PRODUCT_SHARE of the memory available to this process (on K processes the least of
    theirs: the blocks, and their collectives, must agree); a UserError where ``rows`` draws'
    do not fit."""
    from lossfloor.optimal.stream import available_bytes

    per_draw = 2 * _padded(pool.n_held) * itemsize
    own, budget = GRAM_ROWS, 0.0
    if GRAM_ROWS * per_draw > SMALL_PRODUCTS:
        budget = PRODUCT_SHARE * available_bytes() / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        own = min(GRAM_ROWS, int(budget // per_draw) // rows * rows)
    fit = own
    if pool.shards > 1:
        fit = int(pool.across(torch.tensor([[own]], device=pool.device)).min())
    if fit < rows:
        short = f"the {budget / 2**30:.3g} GiB" if own < rows else "what one of the processes has"
        raise UserError(
            f"the gram estimator needs {rows * per_draw / 2**30:.3g} GiB per process for the "
            f"products of {rows} draws with {pool.n_held} points, more than {short} "
            f"({PRODUCT_SHARE:g} of the memory available): use more processes (torchrun) or "
            "another estimator"
        )
    return fit


def _at_sources(mats: Sequence[Tensor], src: Tensor, shared: Pool | None) -> list[Tensor]:
    """Each matrix's source column per row (B×1 each): from this process's columns, or, on a
    sharded pool, from the process that holds the source (all-gathered, 0 from the others:
    their sum is exact)."""
    at = torch.arange(mats[0].shape[0], device=mats[0].device)
    if shared is None:
        return [m[at, src][:, None] for m in mats]
    local = src - shared.first
    held = (local >= 0) & (local < shared.n_held)
    col = local.clamp(0, max(shared.n_held - 1, 0))
    mine = torch.stack([m[at, col] for m in mats], dim=1) * held[:, None]
    k = len(mats)
    both = shared.across(mine).view(at.numel(), -1, k).sum(dim=1)
    return [both[:, j : j + 1] for j in range(k)]


def _row_max(logits: Tensor, shared: Pool | None) -> Tensor:
    """Each row's largest logit (B×1), over every process's columns on a sharded pool."""
    top = logits.amax(dim=1, keepdim=True)
    return top if shared is None else shared.across(top).amax(dim=1, keepdim=True)


def _splitter(shared: Pool | None) -> Callable[[Tensor, Tensor, Tensor], tuple]:
    """``_split``, or ``_shard_split`` across the processes of the sharded pool ``shared``."""
    if shared is None:
        return _split
    return lambda w, src, draws: _shard_split(w, src, draws, shared)


def _split(w: Tensor, src: Tensor, draws: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(the source's weight, the rest's total, L draws from the rest ∝ weight) per row of the
    unnormalised weights ``w`` (B×width, ``_weights``; the source entries are set to 0 in
    place). The draws invert the cumulative weights in two levels: a block of SAMPLE_BLOCK
    columns from the block totals, then a column within it (``_pick``); ``draws`` ∈ (0, 1], so
    a column of weight 0 is never drawn (where a row's rest is 0 its draws are column 0,
    weighted 0)."""
    rows = w.shape[0]
    at = torch.arange(rows, device=w.device)
    own = w[at, src]
    w[at, src] = 0.0
    blocks = w.view(rows, -1, SAMPLE_BLOCK)
    cum = torch.cumsum(blocks.sum(dim=2), dim=1)
    return own, cum[:, -1], _pick(blocks, cum, draws * cum[:, -1:])


def _pick(blocks: Tensor, cum: Tensor, target: Tensor) -> Tensor:
    """The column (B×L) where each row's cumulative weight first reaches ``target`` (B×L),
    from the weights in blocks (B×blocks×SAMPLE_BLOCK) and their cumulative block totals
    ``cum`` (B×blocks): the block, then the column within it."""
    at = torch.arange(blocks.shape[0], device=blocks.device)
    block = torch.searchsorted(cum, target).clamp_(max=cum.shape[1] - 1)
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp_(min=0)), 0.0)
    inner = torch.cumsum(blocks[at[:, None], block], dim=2)  # B×L×SAMPLE_BLOCK
    left = torch.minimum(target - before, inner[..., -1]).clamp_(min=0.0)
    col = torch.searchsorted(inner, left[..., None]).clamp_(max=SAMPLE_BLOCK - 1)[..., 0]
    return block * SAMPLE_BLOCK + col


def _shard_split(
    w: Tensor, src: Tensor, draws: Tensor, shared: Pool
) -> tuple[Tensor, Tensor, Tensor]:
    """``_split`` across the K processes of a sharded pool, each with the weights ``w`` of its
    own columns relative to the same global reference: the source's weight from the process
    that holds it, the rest's total Σ_k m_k of the processes' masses (one all-gather of
    [w_s | m_k]), and the draws' targets u·Σ_k m_k located first among the processes (their
    cumulative masses, the same on every process), then among the owner's columns (``_pick``);
    the global columns all-gathered from their owners. Every process returns the same."""
    rows = w.shape[0]
    at = torch.arange(rows, device=w.device)
    local = src - shared.first
    held = (local >= 0) & (local < shared.n_held)
    own = torch.where(held, w[at, local.clamp(0, w.shape[1] - 1)], 0.0)
    w[at[held], local[held]] = 0.0
    blocks = w.view(rows, -1, SAMPLE_BLOCK)
    cum = torch.cumsum(blocks.sum(dim=2), dim=1)
    both = shared.across(torch.stack([own, cum[:, -1]], dim=1)).view(rows, -1, 2)
    own, through = both[..., 0].sum(dim=1), torch.cumsum(both[..., 1], dim=1)  # B, B×K
    target = draws * through[:, -1:]
    owner = torch.searchsorted(through, target).clamp_(max=through.shape[1] - 1)
    before = torch.where(owner > 0, through.gather(1, (owner - 1).clamp_(min=0)), 0.0)
    mine = _pick(blocks, cum, target - before) + shared.first  # B×L, where this process owns
    picks = shared.across(mine).view(rows, -1, draws.shape[1])  # B×K×L
    return own, through[:, -1], picks.gather(1, owner[:, None, :])[:, 0]
