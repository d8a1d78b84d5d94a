"""Gaussian items (VAE latents): the pool of a mixture of N diagonal Gaussians N(m_i, diag s_i²)
(docs/method.md, "Gaussian items").

With x_t = x0 + σε, x0 ~ N(m_i, diag s_i²) and v_i = s_i² + σ² (per element), component i's
likelihood is N(x_t; m_i, diag v_i), so the posterior over components has the logits

    l_i(x) = −½ Σ_d (x − m_i)²/v_i − ½ Σ_d ln v_i
           = Σ_d x²·(−½/v_i) + Σ_d x·m_i/v_i + c_i,   c_i = −½ Σ_d (m_i²/v_i + ln v_i),

one GEMM of the queries [x² | x | 1] with per-σ keys [−½/v | m/v | c]; and within component i
E[x0 | x, i] = (σ²m_i + s_i²x)/v_i, Var[x0 | x, i] = s_i²σ²/v_i, so the posterior mean is

    μ(x) = Σ_i p_i σ²m_i/v_i + (Σ_i p_i s_i²/v_i)⊙x,

the weights times the value keys [σ²m/v | s²/v | 1] (a second GEMM: 2D values and the
normaliser). Both run in the one loop of the point kernel (``kernel.accumulate_keys``).

Per-query constants do not change the softmax, so the keys subtract them where they cost digits:
the x² column holds −½(1/v_id − r_d) with r_d the mid-range of 1/v_id over the items (0 where
every s_d is equal: for s ≡ 0 these are the point kernel's logits ⟨x, m⟩/σ² − ‖m‖²/2σ²), and
c_i holds −½ Σ_d ln(1 + s_id²/σ²) in place of −½ Σ_d ln v_id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import torch

from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.kernel import (
    ALIGN,
    DEFAULT_TILE_BYTES,
    Adjust,
    SoftmaxState,
    accumulate_keys,
)
from lossfloor.optimal.pools import Pool

if TYPE_CHECKING:
    from lossfloor.optimal.estimators import Estimator

Tensor = torch.Tensor

#: What refusals call Gaussian items.
GAUSSIAN_TEXT = "Gaussian items (VAE latents with a std)"


def _aligned(width: int) -> int:
    return -(-width // ALIGN) * ALIGN


@dataclass(frozen=True)
class MixtureKeys:
    """The per-σ keys of a mixture pool: ``logits`` [−½(1/v − r) | m/v | c | 1 | 0…] (N×W) and
    ``values`` [σ²m/v | s²/v | 1 | 0…] (N×W'), in the pool's dtype."""

    sigma: float
    logits: Tensor
    values: Tensor


@dataclass
class MixturePool(Pool):
    """A pool of Gaussian items: the centred means m_i − x̄ as its rows (``x``, ``sq``), their
    variances s_i² (``var``, float64), A = E‖x0 − x̄‖² = mean_i(‖m_i − x̄‖² + Σ_d s_id²) (so
    the closed form (A − ‖μ‖²)/D holds: E[x0·μ] = E‖μ‖² for any distribution), the per-element
    least and largest s² over every item (``var_lo``, ``var_hi``: the keys' reference and the
    precision guard), and the per-σ keys of the last σ asked for (``keys_at``)."""

    gaussian: ClassVar[bool] = True
    var: Tensor = field(default_factory=lambda: torch.empty(0))
    means: Tensor = field(default_factory=lambda: torch.empty(0))  # m − x̄, float64
    var_lo: Tensor = field(default_factory=lambda: torch.empty(0))
    var_hi: Tensor = field(default_factory=lambda: torch.empty(0))
    _cached: MixtureKeys | None = None

    @classmethod
    def from_items(
        cls, data: Tensor, std: Tensor, dtype: torch.dtype, device: torch.device | str
    ) -> MixturePool:
        """The pool of items N(data_i, diag std_i²) (N×..., both), centred at x̄ = mean_i m_i."""
        n = data.shape[0]
        m64 = data.reshape(n, -1).to(device=device, dtype=torch.float64, copy=True)
        mean = m64.mean(dim=0)
        mc = m64.sub_(mean)
        var = std.reshape(n, -1).to(device=device, dtype=torch.float64).pow(2)
        sq = mc.pow(2).sum(dim=1)
        return cls.of_items(
            mc, var, sq, mean, dtype, a=float((sq + var.sum(dim=1)).mean()),
            max_sq=float(sq.max()), var_lo=var.amin(dim=0), var_hi=var.amax(dim=0),
        )  # fmt: skip

    @classmethod
    def of_items(
        cls, means: Tensor, var: Tensor, sq: Tensor, mean: Tensor, dtype: torch.dtype, **rest: Any
    ) -> Self:
        """The pool of the items m_i − x̄ and s_i² (float64; ‖m_i − x̄‖² ``sq``) about x̄
        ``mean``, its rows in ``dtype`` and no fixed keys (they are per σ: ``keys_at``); the
        other fields (A, max‖·‖², the range of s², ...) from ``rest``."""
        aug = torch.empty(0, 0, dtype=dtype, device=means.device)
        return cls(x=means.to(dtype), sq=sq.to(dtype), mean=mean, aug=aug, var=var, means=means,
                   **rest)  # fmt: skip

    def items(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(m_i − x̄, s_i²) of the items ``idx`` (B), float64."""
        return self.means[idx], self.var[idx]

    def draw(self, idx: Tensor, component: Tensor | None) -> Tensor:
        """x0 = m_i + s_i⊙z of the items ``idx`` (centred; B×D) with z = ``component``."""
        if component is None:
            raise ValueError("draws from Gaussian items need their component noise z")
        means, var = self.items(idx)
        return gaussian_draws(means, var, component, self.dtype)

    def keys_at(self, sigma: float) -> MixtureKeys:
        """The keys at σ (computed in float64 from m and s², O(N·D); the last σ's are kept)."""
        if self._cached is not None and self._cached.sigma == sigma:
            return self._cached
        n, d = self.means.shape
        s2 = sigma * sigma
        inv = 1.0 / (self.var + s2)  # 1/v
        # r_d: a per-query constant ½Σ r x², the same on every shard (1/v falls with s²)
        ref = 0.5 * (1.0 / (self.var_lo + s2) + 1.0 / (self.var_hi + s2))
        logits = torch.zeros(n, _aligned(2 * d + 2), dtype=torch.float64, device=inv.device)
        logits[:, :d] = -0.5 * (inv - ref)
        torch.mul(self.means, inv, out=logits[:, d : 2 * d])
        quad = (self.means.pow(2) * inv).sum(dim=1)
        logits[:, 2 * d] = -0.5 * (quad + torch.log1p(self.var / s2).sum(dim=1))
        logits[:, 2 * d + 1] = 1.0  # the shift column
        values = torch.zeros(n, _aligned(2 * d + 1), dtype=torch.float64, device=inv.device)
        torch.mul(self.means, inv * s2, out=values[:, :d])
        torch.mul(self.var, inv, out=values[:, d : 2 * d])
        values[:, 2 * d] = 1.0
        self._cached = MixtureKeys(sigma, logits.to(self.dtype), values.to(self.dtype))
        return self._cached

    def accumulate(
        self,
        queries: Tensor,
        sigma: float,
        idx: Tensor | None = None,
        exclude: Tensor | None = None,
        tile_bytes: int = DEFAULT_TILE_BYTES,
        *,
        key_logw: Tensor | None = None,
        adjust: Adjust | None = None,
    ) -> SoftmaxState:
        """The softmax state over every component (acc: [Σp σ²m/v | Σp s²/v], 2D wide) of the
        centred ``queries`` (B×D) at σ, component n left out for query b where n = exclude[b]
        (leave-one-out); ``posterior`` turns it into μ. Inner subsets, weights and additions are
        the point estimators' (refused on Gaussian items before any work: ``check_gaussian``)."""
        if idx is not None or key_logw is not None or adjust is not None:
            raise ValueError("a mixture pool's softmax runs over every component")
        b, d = queries.shape
        keys = self.keys_at(sigma)
        q_aug = torch.zeros(b, keys.logits.shape[1], dtype=queries.dtype, device=queries.device)
        torch.mul(queries, queries, out=q_aug[:, :d])
        q_aug[:, d : 2 * d] = queries
        q_aug[:, 2 * d] = 1.0
        state = SoftmaxState.empty(b, 2 * d, queries.dtype, queries.device)
        ids = None
        if exclude is not None:
            first, held = self.first, keys.logits.shape[0]
            ids = torch.arange(first, first + held, device=keys.logits.device)
        return accumulate_keys(
            q_aug, keys.logits, keys.values, 2 * d + 1, state, key_ids=ids, exclude_ids=exclude,
            tile_bytes=tile_bytes,
        )  # fmt: skip

    def posterior(self, state: SoftmaxState, queries: Tensor) -> Tensor:
        """μ = a + b⊙q from [a | b] = acc/z (the component means' σ²m/v and gains s²/v)."""
        d = queries.shape[1]
        ab = state.mean()
        return ab[:, :d] + ab[:, d:] * queries

    def logit_error(self, sigma: float, dtype: torch.dtype) -> float:
        """A bound on one logit's rounding error in ``dtype``: u·(‖q‖²·w + (√(2D)·‖q‖R + R²)/v₀
        + |c|-terms), with v₀ = σ² + min s², w = max_d (max_i 1/v − min_i 1/v)/2 (the x² column
        after its reference), R² = max‖m − x̄‖², ‖q‖² ≤ R² + D(σ² + max s²) (a typical query) and
        ½ Σ_d ln(1 + s²/σ²) ≤ ½D·ln(1 + max s²/σ²): ``kernel.logit_error_bound`` with v₀ for σ²,
        the x² column and the log term."""
        u = torch.finfo(dtype).eps / 2
        d = self.dim
        s2 = sigma * sigma
        lo, hi = float(self.var_lo.min()), float(self.var_hi.max())
        v0 = s2 + lo
        spread = 0.5 * (1.0 / v0 - 1.0 / (s2 + hi))
        r2 = self.max_sq
        q = math.sqrt(r2 + d * (s2 + hi))
        logs = 0.5 * d * math.log1p(hi / s2)
        return u * (q * q * spread + (math.sqrt(2 * d) * q * math.sqrt(r2) + r2) / v0 + logs)


def gaussian_draws(means: Tensor, var: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
    """x0 = m + s⊙z of items with (centred) means ``means`` and variances ``var`` (B×D,
    float64) and their z (B×D), computed in float64, in ``dtype``."""
    return (means + var.sqrt() * z.to(device=means.device, dtype=torch.float64)).to(dtype)


def check_gaussian(estimator: Estimator, draws: str) -> Literal["plain"]:
    """The draws an estimate of Gaussian items takes (``auto``: plain), after refusing what
    does not run on them: an estimator without the capability 'gaussian'
    (``Capabilities.items``), tilted draws. (They run in memory, on one process or sharded
    over several; they never stream: a latent zip or .npz is read whole.)"""
    from lossfloor.optimal.capabilities import having, listed
    from lossfloor.optimal.estimators import declared

    reason = estimator.capabilities.refusal("gaussian")
    if reason is not None:
        able = listed(having(declared(), lambda caps: "gaussian" in caps.items))
        raise UserError(
            f"the {estimator.name} estimator does not run on {GAUSSIAN_TEXT} yet; it lacks the "
            f"capability 'gaussian': {reason} (gaussian: {able})"
        )
    if draws == "tilted":
        raise ParameterError(
            "draws", draws, f"tilted draws shift ε toward neighbouring points; {GAUSSIAN_TEXT} "
            "take plain draws (auto)",
        )  # fmt: skip
    return "plain"
