"""The streaming posterior-mean kernel against float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import posterior_mean_atol

from lossfloor.optimal.kernel import accumulate_softmax, logit_error_bound, posterior_mean

pytestmark = pytest.mark.numerics


def brute_posterior_mean(q: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """μ(q) = Σ softmax_n(−‖q − x_n‖²/2σ²)·x_n with explicit differences, float64."""
    d2 = ((q[:, None, :].double() - x[None, :, :].double()) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ x.double()


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 5.0])
def test_kernel_matches_brute_force_float64(small_set, sigma):
    g = torch.Generator().manual_seed(2)
    q = small_set[torch.randint(40, (17,), generator=g)] + sigma * torch.randn(
        17, 6, generator=g, dtype=torch.float64
    )
    mu = posterior_mean(q, small_set, sigma)
    atol = 2 * posterior_mean_atol(small_set, sigma, torch.float64)  # both within the bound
    torch.testing.assert_close(mu, brute_posterior_mean(q, small_set, sigma), rtol=0, atol=atol)


def test_result_does_not_depend_on_tile_size(small_set):
    q = small_set[:9] + 0.7 * torch.randn(9, 6, dtype=torch.float64)
    ref = posterior_mean(q, small_set, 0.7)
    for tile in (8, 64 * 8, 10**9):  # 1 key per tile (at least 64), many tiles, one tile
        got = posterior_mean(q, small_set, 0.7, tile_bytes=tile)
        # tiles sum in other orders: both within the rounding bound
        atol = 2 * posterior_mean_atol(small_set, 0.7, torch.float64)
        torch.testing.assert_close(got, ref, rtol=0, atol=atol)


def test_running_max_is_per_query():
    """A query far from all points (logits ≈ −1e6) next to a query on a point (logit ≈ 0): a max
    shared across queries would underflow the far query's weights to 0/0."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float32)
    q = torch.tensor([[0.0, 0.0], [300.0, 300.0]], dtype=torch.float32)
    mu = posterior_mean(q, x, 0.2)
    assert torch.isfinite(mu).all()
    torch.testing.assert_close(mu.double(), brute_posterior_mean(q, x, 0.2), rtol=1e-5, atol=1e-6)


def test_no_underflow_in_high_dimensions():
    """Per-dimension pdf products underflow in high D; logits in log space do not."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3000, generator=g)
    q = x[:5] + 0.5 * torch.randn(5, 3000, generator=g)
    mu = posterior_mean(q, x, 0.5)
    assert torch.isfinite(mu).all()
    torch.testing.assert_close(mu.double(), brute_posterior_mean(q, x, 0.5), rtol=1e-4, atol=1e-4)


def test_chunks_can_be_combined_with_a_per_query_term(small_set):
    """Streaming keys in two calls and adding one key per query equals one softmax over all."""
    q = small_set[:5] + 0.4 * torch.randn(5, 6, dtype=torch.float64)
    extra = small_set[10:15]
    state = accumulate_softmax(q, small_set[:20], 0.4)
    state = accumulate_softmax(q, small_set[20:], 0.4, state=state)
    logit = ((q * extra).sum(1) - 0.5 * extra.pow(2).sum(1)) / 0.4**2
    state.add_one(logit, extra)
    # brute force: all 40 points plus a duplicate of point 10+b for query b
    for b in range(5):
        keys = torch.cat([small_set, extra[b : b + 1]])
        ref = brute_posterior_mean(q[b : b + 1], keys, 0.4)
        atol = 2 * posterior_mean_atol(keys, 0.4, torch.float64)
        torch.testing.assert_close(state.mean()[b : b + 1], ref, rtol=0, atol=atol)


def test_excluded_keys_are_masked(small_set):
    q = small_set[:4] + 0.3 * torch.randn(4, 6, dtype=torch.float64)
    ids = torch.arange(40)
    exclude = torch.tensor([0, 1, 2, 3])
    mu = posterior_mean(q, small_set, 0.3, key_ids=ids, exclude_ids=exclude)
    for b in range(4):
        keep = torch.cat([small_set[:b], small_set[b + 1 :]])
        ref = brute_posterior_mean(q[b : b + 1], keep, 0.3)
        atol = 2 * posterior_mean_atol(keep, 0.3, torch.float64)
        torch.testing.assert_close(mu[b : b + 1], ref, rtol=0, atol=atol)


def test_error_bound_grows_as_sigma_shrinks():
    big = logit_error_bound(400.0, 784, 0.01, torch.float32)
    small = logit_error_bound(400.0, 784, 1.0, torch.float32)
    assert big > 1e3 * small
    assert logit_error_bound(400.0, 784, 0.01, torch.float64) < big * 1e-8
    assert math.isfinite(big)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.5, 2.0])
def test_keys_streamed_far_to_near_raise_the_shift_correctly(dtype, sigma):
    """Keys sorted from far to near, 64 per tile: each tile's largest logit exceeds the running
    max by 50…1000 (e^Δ would overflow), and the max is raised to it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    q = x[:3] + 0.3 * sigma * torch.randn(3, 8, generator=g, dtype=torch.float64)
    order = torch.argsort(((x - q[0]) ** 2).sum(1), descending=True)
    keys = x[order]
    tile = 64 * 3 * torch.finfo(dtype).bits // 8
    mu = posterior_mean(q.to(dtype), keys.to(dtype), sigma, tile_bytes=tile).double()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(mu, brute_posterior_mean(q, keys, sigma), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_a_key_that_holds_the_posterior_gives_its_x_to_the_last_bit_in_any_tile(dtype, sigma):
    """Queries on a key, the others e^−40 or less below it (σ ≤ 0.1, spacing ≥ 0.9): μ = that
    key's x bitwise whichever tile holds it, 64 keys per tile, keys far to near and shuffled.
    With the running max left lagging it weighed a rounded e^Δ and μ = acc/z missed x by an
    ulp: ‖x − μ‖² at (u·x)², not the ~e^−100·‖x_k − x‖² it is (issue 27)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 8, generator=g, dtype=torch.float64).to(dtype)
    on = torch.tensor([1999, 1500, 700, 64, 5])
    q = x[on]
    tile = 64 * len(on) * torch.finfo(dtype).bits // 8
    for order in (torch.argsort(((x - q[0]) ** 2).sum(1), descending=True), torch.randperm(2000)):
        mu = posterior_mean(q, x[order], sigma, tile_bytes=tile)
        assert torch.equal(mu, q)
