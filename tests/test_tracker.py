"""lossfloor.GapTracker: the per-σ gap from a loop's own per-sample losses (lossfloor/tracker.py),
each formula against a closed form or a brute-force float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lossfloor
from lossfloor.diffusion import VPDiscrete
from lossfloor.errors import UserError
from lossfloor.optimal import Curve
from lossfloor.tracker import GapTracker
from lossfloor.training.hooks import Batch, TrainingHook

SIGMAS = np.exp(np.linspace(math.log(0.01), math.log(200.0), 25))


def power_curve(sha: str = "a" * 64) -> Curve:
    """A synthetic J*(σ) = 0.2·σ²/(1 + σ²) on 25 σ (x0 units), of data with fingerprint sha."""
    points = [{"sigma": float(s), "optimal_loss": float(0.2 * s**2 / (1 + s**2))} for s in SIGMAS]
    return Curve.from_json({"points": points, "dataset": {"sha256": sha}})


def tracker(**kw) -> GapTracker:
    kw = {"process": "ve", "target": "x0", "half_life": math.inf, **kw}
    return GapTracker(power_curve(), **kw)


def test_public_name_is_the_tracker_class():
    assert lossfloor.GapTracker is GapTracker


def test_gap_is_the_least_squares_quadratic_at_the_bin_centre():
    """Noise-free y = c0 + c1·u + c2·u² with σ mostly on one side of the centre: the fit's
    value at the centre is c0 exactly (a bin mean would be biased by c1·ū + c2·E[u²])."""
    t = tracker(bins=4)
    lo, hi = float(t.edges[1]), float(t.edges[2])  # bin 1
    centre = 0.5 * (lo + hi)
    u = torch.tensor([-0.3, -0.2, -0.1, 0.05, 0.3], dtype=torch.float64) * (hi - lo)
    s = torch.exp(centre + u)
    c0, c1, c2 = 0.013, -0.02, 0.05
    t.update_x0(s, t.optimal_loss(s) + c0 + c1 * u + c2 * u**2)
    row = t.summary()[1]
    assert row["sigma"] == pytest.approx(math.exp(centre), rel=1e-12)
    assert row["gap"] == pytest.approx(c0, abs=1e-12)
    assert row["loss"] == pytest.approx(float(t.optimal_loss(row["sigma"])) + c0, rel=1e-12)
    assert row["ratio"] == pytest.approx(row["loss"] / row["optimal_loss"], rel=1e-12)
    assert row["count"] == 5
    assert row["gap_stderr"] == pytest.approx(0.0, abs=1e-9)
    assert all(r["gap"] is None and r["count"] == 0 for i, r in enumerate(t.summary()) if i != 1)


def test_two_distinct_sigma_give_the_line_through_them():
    """Two σ in a bin (a quadratic is not determined): the line through their means, read at
    the centre (it lies between them)."""
    t = tracker(bins=4)
    lo, hi = float(t.edges[1]), float(t.edges[2])
    centre = 0.5 * (lo + hi)
    u = torch.tensor([-0.2, -0.2, 0.3, 0.3, 0.3], dtype=torch.float64) * (hi - lo)
    y = torch.tensor([0.01, 0.03, 0.05, 0.06, 0.07], dtype=torch.float64)
    s = torch.exp(centre + u)
    t.update_x0(s, t.optimal_loss(s) + y)
    row = t.summary()[1]
    y_lo, y_hi, u_lo, u_hi = 0.02, 0.06, float(u[0]), float(u[-1])
    assert row["gap"] == pytest.approx(y_lo + (y_hi - y_lo) * (0 - u_lo) / (u_hi - u_lo), rel=1e-9)


def test_gap_and_stderr_equal_ordinary_least_squares_in_float64():
    """No decay: the quadratic's value at the centre and its standard error are OLS's,
    computed here with numpy's lstsq and the textbook s.e. (s²·[(XᵀX)⁻¹]₀₀, n − 3 degrees of
    freedom)."""
    g = torch.Generator().manual_seed(3)
    t = tracker(bins=3)
    lo, hi = float(t.edges[1]), float(t.edges[2])
    centre = 0.5 * (lo + hi)
    u = (torch.rand(400, generator=g, dtype=torch.float64) - 0.5) * (hi - lo)
    s = torch.exp(centre + u)
    y = 0.02 + 0.01 * u + 0.03 * u**2 + 0.005 * torch.randn(400, generator=g, dtype=torch.float64)
    for part in torch.split(torch.arange(400), 64):
        t.update_x0(s[part], t.optimal_loss(s[part]) + y[part])
    row = t.summary()[1]
    x = np.stack([np.ones(400), u.numpy(), u.numpy() ** 2], 1)
    beta, res, *_ = np.linalg.lstsq(x, y.numpy(), rcond=None)
    s2 = float(res[0]) / (400 - 3)
    se = math.sqrt(s2 * np.linalg.inv(x.T @ x)[0, 0])
    assert row["sigma"] == pytest.approx(math.exp(centre), rel=1e-12)  # |ū| < sd(u)
    assert row["gap"] == pytest.approx(beta[0], rel=1e-9)
    assert row["gap_stderr"] == pytest.approx(se, rel=1e-9)


def test_half_life_halves_the_weight_of_past_samples():
    """One σ, h samples of a then h of b: weights ½ and 1, so the gap is (a/2 + b)/(3/2) and
    the count 3h/2."""
    t = tracker(bins=2, half_life=100)
    s = torch.full((100,), 1.0, dtype=torch.float64)
    j = t.optimal_loss(s)
    t.update_x0(s, j + 0.3)
    t.update_x0(s, j + 0.6)
    row = next(r for r in t.summary() if r["count"])
    assert row["gap"] == pytest.approx((0.3 / 2 + 0.6) / 1.5, rel=1e-12)
    assert row["count"] == pytest.approx(150, rel=1e-12)
    assert row["sigma"] == pytest.approx(1.0, rel=1e-12)  # one σ: the row is where it is


def test_losses_in_target_units_become_x0_units_with_the_loss_factor():
    """ε-prediction on a discrete VP table: the ε loss is the x0 loss / σ̃² (closed form), so
    update(ℓ_ε, timesteps=t) equals update_x0(σ̃(t), ℓ_ε·σ̃²)."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t_a = tracker(process=VPDiscrete(ac), target="eps")
    t_b = tracker(process=VPDiscrete(ac), target="eps")
    steps = torch.tensor([3, 50, 400, 990])
    sig = torch.sqrt((1 - ac[steps]) / ac[steps])
    ell = torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=torch.float64)
    t_a.update(ell.float(), timesteps=steps)
    t_b.update_x0(sig, ell.float().double() * sig**2)
    for a, b in zip(t_a.summary(), t_b.summary(), strict=True):
        assert (a["gap"] is None) == (b["gap"] is None)
        if a["gap"] is not None:
            assert a["gap"] == pytest.approx(b["gap"], rel=1e-9)


def test_a_diffusers_scheduler_gives_the_discrete_process_and_its_prediction_target():
    from diffusers import DDPMScheduler

    t = GapTracker(power_curve(), scheduler=DDPMScheduler(prediction_type="v_prediction"))
    assert t.process.name == "vp-discrete" and t.target.name == "v"
    ac = DDPMScheduler().alphas_cumprod.double()
    assert torch.allclose(t.process.sigma_ve(torch.tensor(7.0)), ((1 - ac[7]) / ac[7]).sqrt())


def test_log_dict_names_each_bin_by_its_centre_with_the_summary_values():
    t = tracker(bins=4)
    s = torch.tensor([0.02, 0.05, 3.0, 5.0], dtype=torch.float64)
    t.update_x0(s, t.optimal_loss(s) + 0.01)
    rows = t.summary()
    logged = t.log_dict(prefix="lf/")
    expected = {}
    for k, row in enumerate(rows):
        if row["gap"] is not None:
            name = f"sigma={math.exp(float(t.centres[k])):.3g}"
            expected[f"lf/gap/{name}"] = row["gap"]
            expected[f"lf/ratio/{name}"] = row["ratio"]
    assert logged == expected and len(logged) == 4


def test_state_dict_restores_the_bins_and_refuses_other_bins():
    t = tracker(bins=5, half_life=50)
    s = torch.exp(torch.linspace(-4, 5, 40, dtype=torch.float64))
    t.update_x0(s, t.optimal_loss(s) + 0.1 * s.log().abs())
    copy = tracker(bins=5, half_life=50)
    copy.load_state_dict(t.state_dict())
    assert copy.summary() == t.summary()
    with pytest.raises(UserError, match="other σ bins"):
        tracker(bins=6).load_state_dict(t.state_dict())


class _Pair:
    """A Reducer over two processes simulated in one: sum adds the other tracker's sums."""

    world, main = 2, True

    def __init__(self) -> None:
        self.other: GapTracker | None = None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + torch.cat([self.other._m.reshape(-1), self.other._w2])


def test_summaries_reduced_over_processes_equal_one_process_on_the_whole_batch():
    """Two ranks with half of each batch each, reduced, equal one tracker fed whole batches;
    the decay then counts the global batch (n·world)."""
    g = torch.Generator().manual_seed(0)
    pair_a, pair_b = _Pair(), _Pair()
    rank0 = tracker(half_life=300, reduce=pair_a)
    rank1 = tracker(half_life=300, reduce=pair_b)
    pair_a.other, pair_b.other = rank1, rank0
    whole = tracker(half_life=300)
    for _ in range(5):
        s = torch.exp(torch.rand(64, generator=g, dtype=torch.float64) * 9 - 4)
        loss = whole.optimal_loss(s) + 0.05 * torch.rand(64, generator=g, dtype=torch.float64)
        whole.update_x0(s, loss)
        rank0.update_x0(s[:32], loss[:32])
        rank1.update_x0(s[32:], loss[32:])
    for a, b in zip(rank0.summary(), whole.summary(), strict=True):
        for key in a:
            if a[key] is None:
                assert b[key] is None
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-15)


def test_the_tracker_is_a_training_hook_fed_by_batches():
    t, u = tracker(), tracker()
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    loss = t.optimal_loss(s) + 0.02
    assert isinstance(t, TrainingHook)
    t.on_batch(Batch(sigma=s, loss_x0=loss))
    u.update_x0(s, loss)
    assert t.summary() == u.summary()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_bad_input_is_refused_in_one_line():
    t = tracker()
    with pytest.raises(UserError, match=r"per-sample loss, shape \(B,\)") as e:
        t.update(torch.ones(4, 3), sigma=torch.ones(4))
    _one_line(e)
    with pytest.raises(UserError, match="outside the optimal-loss curve") as e:
        t.update(torch.ones(2), sigma=torch.tensor([1.0, 500.0]))
    _one_line(e)
    with pytest.raises(UserError, match="3 sigma for 2 losses") as e:
        t.update(torch.ones(2), sigma=torch.ones(3))
    _one_line(e)
    with pytest.raises(UserError, match="sigma= or timesteps=") as e:
        t.update(torch.ones(2))
    _one_line(e)
    with pytest.raises(UserError, match="not finite") as e:
        t.update(torch.tensor([1.0, math.nan]), sigma=torch.ones(2))
    _one_line(e)
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    with pytest.raises(UserError, match=r"timesteps outside the process's \[0, 999\]") as e:
        tracker(process=VPDiscrete(ac), target="eps").update(torch.ones(2), timesteps=[5, 1000])
    _one_line(e)
    with pytest.raises(UserError, match="other data") as e:
        GapTracker(power_curve("a" * 64), data="b" * 64)
    _one_line(e)
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(UserError, match="has no alphas_cumprod") as e:
        GapTracker(power_curve(), scheduler=FlowMatchEulerDiscreteScheduler())
    _one_line(e)


def test_outside_skip_leaves_out_and_counts_sigma_past_the_curve():
    t, u = tracker(outside="skip"), tracker()
    sigma = torch.tensor([1e-4, 0.5, 2.0, 1e4], dtype=torch.float64)
    t.update(torch.tensor([0.1, 0.2, 0.3, 0.4]), sigma=sigma)
    u.update(torch.tensor([0.2, 0.3]), sigma=sigma[1:3])
    assert t.skipped == 2 and t.summary() == u.summary()


def test_a_curve_of_the_training_data_is_accepted():
    GapTracker(power_curve("c" * 64), data={"sha256": "c" * 64})


def test_batches_from_a_trainer_leave_out_sigma_outside_the_bins_but_count_for_the_decay():
    """update_x0 (the hook's path) drops σ outside the bins' range; update refuses them."""
    t = tracker(bins=2, half_life=4)
    s = torch.tensor([1.0, 1.0, 1e-4, 1e4], dtype=torch.float64)
    t.update_x0(s, t.optimal_loss(s.clamp(0.01, 200)) + 0.1)
    t.update_x0(s[:2], t.optimal_loss(s[:2]) + 0.4)
    row = next(r for r in t.summary() if r["count"])
    # the first batch (4 draws) decays by 2^(−2/4) when the second (2 draws) comes
    w_old = 2 * 0.5**0.5
    assert row["count"] == pytest.approx(w_old + 2, rel=1e-12)
    assert row["gap"] == pytest.approx((0.1 * w_old + 0.4 * 2) / (w_old + 2), rel=1e-12)
