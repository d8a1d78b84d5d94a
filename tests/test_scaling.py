"""Scaling-law fits (``lossfloor.scaling``) and ``lossfloor scaling fit | collect``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lossfloor.cli import main
from lossfloor.optimal import Curve
from lossfloor.optimal.curve import CurvePoint, Total
from lossfloor.scaling import (
    COLUMNS,
    RunRow,
    fit_scaling,
    power_law_fit,
    read_runs,
    write_runs,
)
from lossfloor.scaling.collection import step_flops

# The synthetic law: J(F) = β·F^α + J*(σ), multiplicative noise of 1 % on J − J*.
ALPHA, BETA, NOISE = -0.3, 50.0, 0.01
SIGMAS = (0.5, 2.0, 10.0)


def _curve(total: float | None = 0.2) -> Curve:
    """J*(σ) = 0.1·σ on [0.1, 20] (linear in ln σ between the points) and a total."""
    pts = tuple(CurvePoint(sigma=s, optimal_loss=0.1 * s) for s in (0.1, 0.5, 2.0, 10.0, 20.0))
    tot = None
    if total is not None:
        tot = Total(schedule={"name": "edm"}, optimal_loss=total, stderr=0.0,
                    quadrature_error=0.0, tail=0.0, grid=(0.1, 20.0))  # fmt: skip
    return Curve(points=pts, total=tot)


def _synthetic_rows(seed: int = 0, n_runs: int = 4, n_ckpt: int = 8) -> list[RunRow]:
    """Runs of four sizes, checkpoints spread over 3 decades of F, J = β·F^α·(1+noise) + J*."""
    rng = np.random.default_rng(seed)
    curve = _curve()
    rows = []
    for r in range(n_runs):
        for f in np.geomspace(1e6, 1e9, n_ckpt) * (1 + 0.3 * r):
            for sigma in (*SIGMAS, None):
                floor = curve.total_optimal_loss if sigma is None else float(curve(sigma))
                j = floor + BETA * f**ALPHA * (1 + NOISE * rng.standard_normal())
                rows.append(RunRow(run=f"r{r}", params=1e3 * (r + 1), flops=float(f),
                                   images_seen=f / 1e3, sigma=sigma, loss=float(j)))  # fmt: skip
    return rows


def test_subtracted_fit_recovers_the_law_and_correlates_better_than_the_raw_fit():
    """Tolerances: α within 0.01 and β within 10 % (1 % noise on J − J* over 3 decades of F)."""
    result = fit_scaling(_synthetic_rows(), _curve(), x="flops")
    assert [f.sigma for f in result.fits] == [*SIGMAS, None]
    for f in result.fits:
        sub, raw = f.subtracted, f.raw
        assert abs(sub.alpha - ALPHA) < 0.01, f
        assert abs(sub.beta / BETA - 1) < 0.10, f
        assert abs(sub.rho) > abs(raw.rho), f
        assert sub.rho < -0.99 and sub.r2 > raw.r2
        assert len(sub.dropped) == 0 and len(sub.residuals) == len(f.x) == 32
        # the raw fit bends toward the floor: its exponent is too shallow
        assert raw.alpha > ALPHA + 0.05
        # the offset fit finds the floor: c ≈ J* within 3 standard errors (and 5 % of J*)
        off = f.offset
        assert off is not None and off.c_stderr is not None and off.c_stderr > 0
        assert abs(off.c_minus_optimal) < max(3 * off.c_stderr, 0.05 * f.optimal_loss), off
        assert abs(off.alpha - ALPHA) < 0.05


def test_rows_at_or_below_the_floor_are_counted_and_listed():
    rows = _synthetic_rows()
    low = RunRow(run="under", params=1.0, flops=5e8, images_seen=1.0, sigma=2.0, loss=0.19)
    result = fit_scaling([*rows, low], _curve(), sigmas=[2.0])
    (f,) = result.fits
    assert len(f.subtracted.dropped) == 1 and f.subtracted.dropped[0][0] == "under"
    assert f.subtracted.n == len(f.x) - 1 == f.raw.n - 1
    obj = result.to_json()["fits"][0]
    assert obj["subtracted"]["dropped_rows"] == 1 and obj["sigma"] == 2.0
    assert set(obj) >= {"sigma", "optimal_loss", "raw", "subtracted", "offset"}
    assert set(obj["offset"]) >= {"alpha", "beta", "c", "c_stderr"}


def test_power_law_fit_is_exact_on_a_noiseless_law():
    x = np.geomspace(1, 1e4, 6)
    fit = power_law_fit(x, 3.0 * x**-0.5 + 0.25, floor=0.25)
    assert fit.alpha == pytest.approx(-0.5, abs=1e-10) and fit.beta == pytest.approx(3.0)
    assert fit.rho == pytest.approx(-1.0) and fit.r2 == pytest.approx(1.0)
    assert max(abs(r) for r in fit.residuals) < 1e-10


def test_flop_counter_matches_a_hand_count_for_a_linear_layer():
    """y = x·Wᵀ + b, B×I → B×O: forward 2·B·I·O, backward (weight gradient only, x needs
    none) 2·B·I·O; bias additions are not counted."""
    b, i, o = 16, 32, 8
    layer = torch.nn.Linear(i, o)
    x = torch.randn(b, i)
    assert step_flops(lambda: layer(x).sum()) == 4 * b * i * o
    x.requires_grad_(True)  # the input's gradient is one more B×O·O×I product
    assert step_flops(lambda: layer(x).sum()) == 6 * b * i * o


def test_runs_csv_round_trips(tmp_path):
    rows = _synthetic_rows(n_runs=1, n_ckpt=3)
    rows[0] = RunRow(**{**rows[0].__dict__, "extra": {"step": "5"}})
    path = tmp_path / "runs.csv"
    write_runs(path, rows)
    back = read_runs(path)
    assert [(r.run, r.sigma, r.loss, r.flops) for r in back] == [
        (r.run, r.sigma, r.loss, r.flops) for r in rows
    ]
    assert back[0].extra["step"] == "5" and back[1].extra["step"] == ""


@pytest.mark.slow
def test_fit_cli_writes_the_json_and_the_plot(tmp_path, capsys):
    runs, est = tmp_path / "runs.csv", tmp_path / "est.json"
    write_runs(runs, _synthetic_rows())
    _curve().save(est)
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    rc = main(["scaling", "fit", "--runs", str(runs), "--optimal", str(est), "--sigma", "10",
               "--out", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    obj = json.loads(out.read_text())
    assert obj["x"] == "flops" and [f["sigma"] for f in obj["fits"]] == [10.0]
    assert obj["fits"][0]["optimal_loss"] == pytest.approx(1.0)
    assert png.stat().st_size > 1000


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


HEADER = ",".join(COLUMNS)


@pytest.mark.parametrize(
    ("csv_text", "extra", "message"),
    [
        ("run,params,flops,sigma,loss\na,1,1,1,1\n", [], "missing column(s) images_seen"),
        (f"{HEADER}\na,1,0,1,1,1\na,1,2,1,1,1\na,1,3,1,1,1\n", [],
         "flops = 0 (run 'a') is not > 0"),
        (f"{HEADER}\n" + "".join(f"a,1,{f},1,2.0,0.1\n" for f in (1, 2, 3, 4)), [],
         "0 of 4 rows have J > J*"),
        (f"{HEADER}\n" + "".join(f"a,1,{f},1,50,9\n" for f in (1, 2, 3, 4)), [],
         "σ = 50 of the runs is outside the estimate's grid [0.1, 20]"),
        ("", [], "is empty"),
        (f"{HEADER}\n", [], "has a header but no rows"),
        (f"{HEADER}\na,1,x,1,1,1\n", [], "flops = 'x' is not a number"),
        (f"{HEADER}\na,1,1,1,1,1\n", ["--sigma", "3"], "--sigma 3.0: no rows at this σ"),
    ],
    ids=["missing-column", "non-positive-F", "all-below-floor", "sigma-outside", "empty",
         "no-rows", "not-a-number", "sigma-not-in-file"],
)  # fmt: skip
def test_bad_fit_input_is_one_line_exit_2(tmp_path, capsys, csv_text, extra, message):
    est = tmp_path / "est.json"
    _curve().save(est)
    runs = _write(tmp_path / "runs.csv", csv_text)
    out = tmp_path / "fit.json"
    rc = main(["scaling", "fit", "--runs", runs, "--optimal", str(est), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_total_rows_need_an_estimate_with_a_total(tmp_path, capsys):
    est = tmp_path / "est.json"
    _curve(total=None).save(est)
    runs = tmp_path / "runs.csv"
    write_runs(runs, [r for r in _synthetic_rows() if r.sigma is None])
    rc = main(["scaling", "fit", "--runs", str(runs), "--optimal", str(est)])
    err = capsys.readouterr().err
    assert rc == 2 and "the estimate has no total" in err and err.count("\n") == 1


def test_an_estimate_without_a_total_fits_the_sigmas_and_says_the_total_is_left_out(
    tmp_path, capsys
):
    """What `scaling collect` writes (per-σ rows and a total) fits against an estimate made
    with estimate's defaults (no --total): every σ is fitted, the total left out with a note."""
    est = tmp_path / "est.json"
    _curve(total=None).save(est)
    runs = tmp_path / "runs.csv"
    rows = _synthetic_rows()
    write_runs(runs, rows)
    out = tmp_path / "fit.json"
    rc = main(["scaling", "fit", "--runs", str(runs), "--optimal", str(est), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "the total is left out" in err and err.count("\n") == 1
    fitted = [f["sigma"] for f in json.loads(out.read_text())["fits"]]
    assert None not in fitted
    assert sorted(fitted) == sorted({r.sigma for r in rows if r.sigma is not None})


@pytest.fixture
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
@pytest.mark.usefixtures("_private_cache", "one_thread")
def test_collect_rows_equal_diagnose_on_the_same_draws(tmp_path, capsys):
    """A tiny run on 100 digits, snapshots at steps 2 and 4: per-σ loss = diagnose's model loss
    on the same (outer, seed), the total is the schedule's quadrature of it, FLOPs ∝ step."""
    from lossfloor.data import load_dataset
    from lossfloor.diagnosis import diagnose
    from lossfloor.models import load_run
    from lossfloor.schedules import get_schedule
    from lossfloor.training import TrainConfig, train

    ds = load_dataset("digits", limit=100)
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch=8, model="tiny", warmup=0, checkpoint_every=2,
                      snapshot_every=2, log_every=1)  # fmt: skip
    train(cfg, ds, run, progress=False)
    out = tmp_path / "runs.csv"
    rc = main(["scaling", "collect", str(run), "--data", "digits", "--limit", "100",
               "--sigmas", "0.3,1,4", "--outer", "64", "--seed", "3", "--out", str(out),
               "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = read_runs(out)
    assert len(rows) == 2 * 4  # two checkpoints × (3 σ + total)
    by_step = {int(r.extra["step"]) for r in rows}
    assert by_step == {2, 4}
    per_step_flops = {int(r.extra["step"]): r.flops / int(r.extra["step"]) for r in rows}
    assert per_step_flops[2] == per_step_flops[4] > 0
    for step in (2, 4):
        model, config = load_run(run / f"checkpoint-{step:08d}.pt")
        ref = diagnose(model, ds, [0.3, 1.0, 4.0], outer=64, seed=3, progress=False)
        mine = {r.sigma: r for r in rows if int(r.extra["step"]) == step}
        for p in ref.points:
            assert mine[p.sigma].loss == p.model_loss
            assert float(mine[p.sigma].extra["optimal_loss"]) == p.optimal_loss
            assert mine[p.sigma].params == config["parameters"]
            assert mine[p.sigma].images_seen == step * 8
        total = Total.compute(np.array([0.3, 1.0, 4.0]),
                              np.array([p.model_loss for p in ref.points]),
                              np.zeros(3), get_schedule(config["schedule"]))  # fmt: skip
        assert math.isclose(mine[None].loss, total.optimal_loss, rel_tol=1e-12)
