"""Typed results (Curve, Diagnosis) against files written before they existed; the estimator
registry; library errors that name parameters; resume through the Python API; M ≥ 2."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from tolerances import sum_rtol

import lossfloor.optimal.estimate as estimate_module
from lossfloor.cli import main
from lossfloor.cli.common import parse_sigmas
from lossfloor.data import load_dataset
from lossfloor.diagnosis import Diagnosis, diagnose
from lossfloor.diffusion import get_process, get_target
from lossfloor.errors import ParameterError
from lossfloor.optimal import (
    CDOL,
    DOL,
    ESTIMATORS,
    SNIS,
    Curve,
    Full,
    Pool,
    SoftmaxState,
    Subset,
    Total,
    accumulate_softmax,
    estimate_curve,
    make_estimator,
    posterior_mean,
)
from lossfloor.optimal.curve import REFINE
from lossfloor.schedules import get_schedule

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
#: Written by lossfloor before the typed results (digits; cDOL on VP-ε with a VP total; a
#: diagnosis of a tiny EDM run) and by the full Fashion-MNIST runs in docs/.
CURVE_FILES = [
    DATA / "digits-demo.json",
    DATA / "digits-cdol-vp.json",
    ROOT / "docs/results/fmnist-full.json",
]
DIAGNOSIS_FILES = [DATA / "digits-diagnosis.json", ROOT / "docs/results/fmnist-diagnosis.json"]


@pytest.fixture(scope="module")
def digits200():
    return load_dataset("digits", limit=200)


def as_written(obj) -> str:
    """The text ``lossfloor.io.write_json`` writes for ``obj``."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def without_seconds(rec: dict) -> dict:
    return {
        **rec,
        "points": [{k: v for k, v in p.items() if k != "seconds"} for p in rec["points"]],
    }


# --- typed results ------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("path", CURVE_FILES, ids=lambda p: p.name)
def test_the_views_of_a_curve_come_from_its_points(path):
    rec = json.loads(path.read_text())
    curve = Curve.load(path)
    pts = sorted(rec["points"], key=lambda p: p["sigma"])
    assert curve.sigmas.tolist() == [p["sigma"] for p in pts]
    assert curve.values.tolist() == [p["optimal_loss"] for p in pts]
    assert curve.stderrs.tolist() == [p["stderr"] for p in pts]
    mid = math.sqrt(pts[3]["sigma"] * pts[4]["sigma"])  # halfway in ln σ
    halfway = (pts[3]["optimal_loss"] + pts[4]["optimal_loss"]) / 2
    assert float(curve(mid)) == pytest.approx(halfway, rel=1e-12)
    assert curve.total_optimal_loss == rec["total"]["optimal_loss"]
    # the total is a function of the points: recomputing it gives the recorded one, to the
    # rounding of its sums (the file was written on another CPU; see ``_assert_same_total``)
    schedule = get_schedule(rec["total"]["schedule"]["name"])
    again, recorded = curve.total_under(schedule), Total.from_json(rec["total"])
    _assert_same_total(again, recorded, len(pts), exact_densities=schedule.name == "edm")
    # the estimator block splits into the estimator's config and the draws, and rebuilds
    block = rec["estimator"]
    assert (curve.outer, curve.seed, curve.form) == (block["outer"], block["seed"], block["form"])
    est = ESTIMATORS.from_config(curve.estimator)
    assert {
        **est.to_config(),
        "outer": curve.outer,
        "seed": curve.seed,
        "form": curve.form,
    } == block


def _assert_same_total(again: Total, recorded: Total, points: int, exact_densities: bool) -> None:
    """A total recomputed here equals one written elsewhere to the rounding of its sums.

    ``Total.compute`` sums q·w·J* over the REFINE-fold finer grid (trapezoid weights), then
    the points' values times their weights; the tail sums a density over 2001 points. Each
    term comes from exp and log of this CPU's vectorised kernels (|the exponent| ≤ 7²/2 for
    EDM's 7 standard deviations: ≤ 32 ulps); ``sum_rtol`` bounds the sums. The quadrature
    error |cubic − linear| is a difference of two such sums, bounded in absolute terms. VP and
    FM densities now come from the process objects (σ̃(t), t(σ̃), d ln σ̃/dt), whose float64
    rounding differs from the old closed forms by ~1e-14 relative: 1e-12 and 1e-9 there."""
    assert (again.schedule, again.grid) == (recorded.schedule, recorded.grid)
    rtol = sum_rtol(REFINE * (points - 1) + 1 + points, per_term_ulps=32)
    tail_rtol = sum_rtol(2001, per_term_ulps=32)
    if not exact_densities:
        rtol, tail_rtol = 1e-12, 1e-9
    assert again.optimal_loss == pytest.approx(recorded.optimal_loss, rel=rtol, abs=0)
    assert again.stderr == pytest.approx(recorded.stderr, rel=rtol, abs=0)
    assert again.tail == pytest.approx(recorded.tail, rel=tail_rtol, abs=0)
    quadrature = 2 * rtol * again.optimal_loss  # |cubic − value|: each sum to rtol
    assert again.quadrature_error == pytest.approx(recorded.quadrature_error, rel=0, abs=quadrature)


@pytest.mark.numerics
@pytest.mark.parametrize("path", DIAGNOSIS_FILES, ids=lambda p: p.name)
def test_a_diagnosis_file_reads_and_writes_back_byte_for_byte(path, tmp_path):
    """The target-unit values and the relative gap are derived on reading: they come out equal
    to the recorded ones bit for bit."""
    result = Diagnosis.load(path)
    assert as_written(result.to_json()) == path.read_text()
    assert result.largest_gap.gap == max(p["gap"] for p in json.loads(path.read_text())["points"])
    result.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


@pytest.mark.slow
def test_curve_save_writes_what_the_cli_writes(tmp_path, capsys, digits200):
    out = tmp_path / "cli.json"
    rc = main(["estimate", "--data", "digits", "--limit", "200", "--sigmas", "0.1:10:4",
               "--total", "edm", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    curve = estimate_curve(
        digits200,
        parse_sigmas("0.1:10:4"),
        make_estimator("full", 200),
        process=get_process("edm"),
        target=get_target("F", sigma_data=0.5),
        schedule=get_schedule("edm"),
        progress=False,
    )
    curve.save(tmp_path / "api.json")
    cli, api = (json.loads((tmp_path / f).read_text()) for f in ("cli.json", "api.json"))
    assert "provenance" not in api and cli.pop("provenance")["command"].startswith("lossfloor ")
    assert list(api) == list(cli)
    assert without_seconds(api) == without_seconds(cli)


@pytest.mark.parametrize(
    "points,message",
    [
        ([], "no points"),
        ([{"sigma": 1.0}], "expected points with sigma, optimal_loss"),
        ([{"sigma": 1.0, "optimal_loss": 0.1, "bogus": 1}], "unknown point field 'bogus'"),
    ],
)
def test_malformed_curves_are_user_errors(points, message):
    from lossfloor.errors import UserError

    with pytest.raises(UserError, match=message):
        Curve.from_json({"points": points})


# --- the estimator registry ---------------------------------------------------------------

#: The estimator blocks (less outer, seed, form) that result files hold.
RECORDED = [
    {"name": "full", "inner": None, "C": None},
    {"name": "cdol", "inner": 180, "C": 39.93333333333333, "replace": False,
     "exclude_source": True, "layout": "shared", "share": 256},
    {"name": "cdol", "inner": 20, "C": "inf", "replace": False, "exclude_source": True,
     "layout": "shared", "share": 256},
    {"name": "snis", "inner": 100, "C": None, "replace": False, "exclude_source": False,
     "layout": "independent", "share": None},
    {"name": "dol", "inner": 100, "C": 1.0, "replace": True, "exclude_source": True,
     "layout": "shared", "share": 256},
]  # fmt: skip


@pytest.mark.parametrize("config", RECORDED, ids=lambda c: c["name"])
def test_recorded_estimator_configs_round_trip(config):
    est = ESTIMATORS.from_config(config)
    assert est.name == config["name"]
    assert est.to_config() == config
    assert list(est.to_config()) == list(config)  # the key order of the JSON
    assert ESTIMATORS.from_config(est.to_config()) == est


def test_make_estimator_builds_what_the_cli_recorded():
    """The blocks of the reference runs (digits, N = 1797), from the CLI's arguments."""
    n = 1797
    assert make_estimator("cdol", n, inner=180, C="paper").to_config() == RECORDED[1]
    assert make_estimator("snis", n, inner=100, layout="independent").to_config() == RECORDED[3]
    assert make_estimator("dol", n, inner=100, replace=True).to_config() == RECORDED[4]
    assert make_estimator("full", n) == Full()


def test_an_estimators_name_follows_its_C():
    """Regression: ``Subset(inner, C=1)`` used to call itself "snis". The name now comes from
    the class, and each class admits only its own C: snis None, dol 1, cdol any C > 0."""
    assert [cls.name for cls in (SNIS, DOL, CDOL)] == ["snis", "dol", "cdol"]
    assert ESTIMATORS.create("dol", inner=10).to_config()["C"] == 1.0
    assert ESTIMATORS.create("cdol", inner=10, C=1).name == "cdol"  # cDOL at C = 1 is DOL
    with pytest.raises(ParameterError) as exc:
        ESTIMATORS.create("snis", inner=10, C=1.0)
    assert exc.value.param == "C"
    with pytest.raises(ParameterError, match="dol is C = 1"):
        ESTIMATORS.from_config({"name": "dol", "inner": 10, "C": 4.0})
    with pytest.raises(TypeError):
        Subset(inner=10, C=1.0)  # no estimator without a name


def test_kernel_and_estimator_posterior_means_are_both_tensors(small_set):
    """Regression: the kernel's ``posterior_mean`` returned a SoftmaxState while
    ``Estimator.posterior_mean`` returned μ. Both return μ now; the state is
    ``accumulate_softmax``'s."""
    q = small_set[:5] + 0.3 * torch.randn(5, 6, dtype=torch.float64)
    pool = Pool.from_data(small_set, torch.float64, "cpu")
    queries = q - pool.mean
    from_kernel = posterior_mean(queries, pool.x, 0.7)
    from_estimator = Full().posterior_mean(pool, queries, None, 0.7, torch.Generator())
    state = accumulate_softmax(queries, pool.x, 0.7)
    assert isinstance(state, SoftmaxState)
    assert isinstance(from_kernel, torch.Tensor) and isinstance(from_estimator, torch.Tensor)
    torch.testing.assert_close(from_kernel, from_estimator, rtol=0, atol=1e-15)
    torch.testing.assert_close(from_kernel, state.mean(), rtol=0, atol=0)


# --- errors name the library's parameters; the CLI its options ---------------------------


@pytest.mark.parametrize(
    "call,param",
    [
        (lambda x: make_estimator("cdol", 100, inner=10, C=0), "C"),
        (lambda x: make_estimator("dol", 100, inner=1), "inner"),
        (lambda x: make_estimator("snis", 100, inner=10, layout="diagonal"), "layout"),
        (lambda x: make_estimator("snis", 100, inner=10, share=0), "share"),
        (lambda x: make_estimator("full", 100, inner=10), "inner"),
        (lambda x: estimate_curve(x, [1.0], Full(), form="mean", progress=False), "form"),
        (lambda x: estimate_curve(x, [1.0], Full(), precision="half", progress=False), "precision"),
        (lambda x: estimate_curve(x, [1.0], Full(), outer=1, progress=False), "outer"),
        (lambda x: estimate_curve(x, [], Full(), progress=False), "sigmas"),
    ],
)
def test_library_errors_name_parameters_not_options(call, param, small_set):
    with pytest.raises(ParameterError) as exc:
        call(small_set)
    assert exc.value.param == param
    assert "--" not in str(exc.value)
    assert str(exc.value).startswith(f"{param} = ")


@pytest.mark.parametrize(
    "args,shown",
    [
        (["--dtype", "half"], "--dtype half: expected one of auto, float32, float64"),
        (["--form", "mean"], "--form mean: expected one of"),
        (["--estimator", "snis", "--inner", "20", "--layout", "diagonal"], "--layout diagonal:"),
        (["--estimator", "snis", "--inner", "20", "--share", "0"], "--share 0: must be ≥ 1"),
        (["--estimator", "cdol", "--inner", "20", "--C", "0"], "--C 0: the correction C"),
        (["--estimator", "dol", "--inner", "1"], "--inner 1: the inner set needs at least 2"),
        (
            ["--estimator", "full", "--inner", "5"],
            "--inner 5: applies to snis, dol, cdol, stratified and gram, not full",
        ),
        (["--outer", "1"], "--outer 1: need at least 2 outer samples"),
    ],
)
def test_the_cli_reports_library_errors_under_its_options(args, shown, tmp_path, capsys):
    rc = main(["estimate", "--data", "digits", "--limit", "50", "--sigmas", "1", *args,
               "--out", str(tmp_path / "x.json"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert shown in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["estimate", "diagnose"])
def test_outer_below_2_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    """Regression: ``--outer 1`` was accepted by the CLI and rejected after loading the data."""
    import lossfloor.cli.common

    def no_loading(args):
        raise AssertionError("data loaded before --outer was checked")

    monkeypatch.setattr(lossfloor.cli.common, "load_data_from_args", no_loading)
    extra = ["--model", "optimal"] if command == "diagnose" else []
    rc = main([command, *extra, "--data", "digits", "--outer", "1", "--sigmas", "1",
               "--out", str(tmp_path / "x.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--outer 1: need at least 2" in err, err


def test_api_refuses_outer_below_2_before_computing(small_set, monkeypatch, digits200):
    def no_work(*a, **k):
        raise AssertionError("computed before M was checked")

    monkeypatch.setattr(estimate_module, "per_sample_values", no_work)
    with pytest.raises(ParameterError, match="outer = 1"):
        estimate_curve(small_set, [1.0], Full(), outer=1, progress=False)
    with pytest.raises(ParameterError, match="outer = 1"):
        diagnose(lambda x, s, labels=None: x, digits200, [1.0], outer=1, progress=False)


@pytest.mark.parametrize(
    "module", ["estimate/__init__", "estimate/inputs", "estimate/report", "diagnose"]
)
def test_subcommand_modules_import_nothing_heavy_at_top_level(module):
    """Top-level imports of cli/estimate/*.py and cli/diagnose.py (TYPE_CHECKING blocks aside):
    no torch, numpy, scipy, matplotlib, tqdm or lossfloor module that imports them itself."""
    tree = ast.parse((ROOT / f"src/lossfloor/cli/{module}.py").read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module)
    heavy = ("torch", "numpy", "scipy", "matplotlib", "tqdm", "lossfloor.optimal",
             "lossfloor.diagnosis", "lossfloor.data", "lossfloor.models", "lossfloor.plots",
             "lossfloor.diffusion", "lossfloor.schedules", "lossfloor.io")  # fmt: skip
    assert not [n for n in names if n.startswith(heavy)], names


# --- resume through the Python API -------------------------------------------------------


@pytest.mark.slow
def test_estimate_curve_resumes_from_its_checkpoint(tmp_path, monkeypatch, digits200):
    sigmas = [0.2, 0.5, 1.0, 2.0, 5.0]
    est = make_estimator("cdol", 200, inner=40)
    kw = dict(seed=3, schedule=get_schedule("edm"), progress=False)
    ref = estimate_curve(digits200, sigmas, est, **kw)

    ckpt = tmp_path / "curve.partial"
    real = estimate_module.per_sample_values
    calls = []

    def flaky(*a, **k):
        calls.append(a[2])  # σ
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(estimate_module, "per_sample_values", flaky)
    with pytest.raises(KeyboardInterrupt):
        estimate_curve(digits200, sigmas, est, checkpoint=ckpt, **kw)
    assert [p["sigma"] for p in json.loads(ckpt.read_text())["done"].values()] == sigmas[:2]

    calls.clear()
    monkeypatch.setattr(estimate_module, "per_sample_values",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))  # fmt: skip
    resumed = estimate_curve(digits200, sigmas, est, checkpoint=ckpt, **kw)
    assert calls == sigmas[2:]  # only the missing σ are computed
    assert not ckpt.exists()  # a complete curve needs no checkpoint
    assert without_seconds(resumed.to_json()) == without_seconds(ref.to_json())


@pytest.mark.slow
@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"key": "other options", "done": {"sigma=0.5": {"sigma": 0.5}}}),
        '{"key": "truncated',
        json.dumps({"done": 3}),
    ],
    ids=["foreign", "truncated", "malformed"],
)
def test_a_foreign_or_unreadable_checkpoint_is_refused_unless_restart(
    tmp_path, monkeypatch, content, small_set
):
    ref = estimate_curve(small_set, [0.5, 1.0], Full(), progress=False)
    ckpt = tmp_path / "c.partial"
    ckpt.write_text(content)
    real = estimate_module.per_sample_values
    calls = []
    monkeypatch.setattr(estimate_module, "per_sample_values",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))  # fmt: skip
    with pytest.raises(ParameterError) as exc:
        estimate_curve(small_set, [0.5, 1.0], Full(), checkpoint=ckpt, progress=False)
    assert exc.value.param == "restart" and calls == [] and ckpt.read_text() == content
    got = estimate_curve(
        small_set, [0.5, 1.0], Full(), checkpoint=ckpt, restart=True, progress=False
    )
    assert calls == [0.5, 1.0]
    assert without_seconds(got.to_json()) == without_seconds(ref.to_json())
    assert not ckpt.exists()


def test_a_checkpoint_of_another_seed_is_refused_not_reused(tmp_path, monkeypatch, small_set):
    ckpt = tmp_path / "c.partial"
    real = estimate_module.per_sample_values
    calls = []

    def interrupt_second(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(estimate_module, "per_sample_values", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        estimate_curve(small_set, [0.5, 1.0], Full(), seed=0, checkpoint=ckpt, progress=False)
    assert len(json.loads(ckpt.read_text())["done"]) == 1
    monkeypatch.setattr(estimate_module, "per_sample_values",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))  # fmt: skip
    calls.clear()
    with pytest.raises(ParameterError, match="other data or options"):
        estimate_curve(small_set, [0.5, 1.0], Full(), seed=1, checkpoint=ckpt, progress=False)
    assert calls == []
    estimate_curve(
        small_set, [0.5, 1.0], Full(), seed=1, checkpoint=ckpt, restart=True, progress=False
    )
    assert calls == [0.5, 1.0]
