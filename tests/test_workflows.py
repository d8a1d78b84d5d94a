"""The estimate → diagnose → schedule → train workflow (issue 27 items 3, 4, 7): the README's
workflow block run as written, diagnosis on an estimate's tilted draws checked against
independent references, and the defaults of one command meeting the next's."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_hardening import one_line_error

from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.diagnosis import REL_FLOOR, diagnose
from lossfloor.optimal import Curve, Full, OptimalDenoiser, estimate_curve
from lossfloor.schedules.optimal import OptimalLossSchedule, gap_range

README = Path(__file__).resolve().parents[1] / "README.md"

#: The sizes the README's workflow comment says the test substitutes.
LIMIT, STEPS = "64", "2"

#: relative float32 rounding between two evaluation paths of the same μ (the estimate works on
#: pre-centred data, the optimal model on raw inputs; as in test_diagnosis): ~16 round-offs
ROUNDING = 1e-6

#: Standard errors within which an unbiased mean must land (a fixed seed: deterministic).
Z = 3.0


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Cache files (J*, neighbour indexes) go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits64():
    return load_dataset("digits", limit=int(LIMIT))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits64):
    """A tiny trained run (2 steps) on the 64 digits: EDM's σ range [0.002, 80]."""
    from lossfloor.training.loop import TrainConfig, train

    run = tmp_path_factory.mktemp("run") / "r"
    train(TrainConfig(steps=2, batch=8, model="tiny", log_every=1), digits64, run,
          progress=False)  # fmt: skip
    return run


def readme_workflow() -> list[list[str]]:
    """The argv of each command of the README block after the ``<!-- workflow`` comment
    (continuation lines joined, comments dropped), with the substitutions the comment names."""
    text = README.read_text()
    match = re.search(r"<!-- workflow:.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert match, "README.md has no workflow block"
    commands = []
    for line in match.group(1).replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "lossfloor", line
        out = []
        for i, arg in enumerate(argv[1:]):
            out.append(STEPS if i and argv[i] == "--steps" else arg)
            if arg == "digits" and argv[i] == "--data":
                out += ["--limit", LIMIT]
        commands.append(out)
    return commands


@pytest.mark.slow
def test_readme_workflow_runs_as_written_with_every_default(tmp_path, monkeypatch, capsys):
    """Items 3 and 4 end to end: the estimate's default (tilted) draws feed diagnose --curve,
    whose σ outside the model's range (100 > 80) are left out with a note; the schedule and
    train --schedule optimal take the gap's σ range with a note."""
    monkeypatch.chdir(tmp_path)
    commands = readme_workflow()
    assert [c[0] for c in commands] == ["train", "estimate", "diagnose", "schedule", "train"]
    errs = {}
    for argv in commands:
        rc = main(argv)
        errs[argv[0]] = capsys.readouterr().err
        assert rc == 0, (argv, errs[argv[0]])
    curve = Curve.load("digits.json")
    assert curve.draws == "tilted" and curve.sigmas[-1] > 80  # the defaults the issue names
    gap = json.loads(Path("gap.json").read_text())
    assert gap["draws"] == "tilted" and gap["paired"] is False
    kept = [s for s in curve.sigmas.tolist() if 0.002 <= s <= 80]
    assert [p["sigma"] for p in gap["points"]] == kept and len(kept) == len(curve.sigmas) - 1
    left_out = "100 of digits.json lie outside the model's range [0.002, 80]: left out"
    assert left_out in errs["diagnose"]
    params = json.loads(Path("schedule.json").read_text())["params"]
    assert (params["sigma_min"], params["sigma_max"]) == (kept[0], kept[-1])
    note = f"the schedule draws σ in [{kept[0]:.4g}, {kept[-1]:.4g}], not [0.002, 80]"
    assert note in errs["schedule"] and note in errs["train"]
    config = json.loads(Path("runs/digits-optimal/config.json").read_text())
    assert config["schedule"]["sigma_max"] == kept[-1]


def _tilted_estimate(tmp_path, sigmas: str, outer: int = 128) -> Path:
    est = tmp_path / "est.json"
    argv = ["estimate", "--data", "digits", "--limit", LIMIT, "--sigmas", sigmas, "--outer",
            str(outer), "--seed", "3", "--quiet", "--out", str(est)]  # fmt: skip
    assert main(argv) == 0
    return est


@pytest.mark.slow
def test_optimal_model_on_an_estimates_tilted_draws_reproduces_its_values(tmp_path, capsys):
    """--model optimal against an estimate on its default tilted draws: the model's loss is
    the estimate's direct form to float32 rounding at every σ (the same draws, the same
    weights and control variate), so the gap is 0 within its ± and the rounding."""
    est = _tilted_estimate(tmp_path, "0.05,0.3,1,3,10")
    capsys.readouterr()
    out = tmp_path / "d.json"
    assert main(["diagnose", "--model", "optimal", "--data", "digits", "--limit", LIMIT,
                 "--curve", str(est), "--quiet", "--out", str(out)]) == 0  # fmt: skip
    curve, rec = Curve.load(est), json.loads(out.read_text())
    assert rec["draws"] == "tilted" and rec["outer"] == 128 and rec["seed"] == 3
    for p, c in zip(rec["points"], curve.points, strict=True):
        assert p["optimal_loss"] == c.direct
        assert p["model_loss"] == pytest.approx(c.direct, rel=ROUNDING, abs=1e-15), p
        assert abs(p["gap"]) <= Z * p["gap_stderr"] + ROUNDING * c.direct + 1e-15, p


@pytest.mark.slow
def test_paired_gap_on_tilted_draws_is_zero_for_the_optimal_model(digits64):
    """Paired on tilted draws (J* computed here): J* is the estimate's direct form on the same
    draws, and the optimal model's gap is 0 within the paired s.e. and the rounding."""
    sigmas = [0.05, 0.3, 1.0, 3.0]
    curve = estimate_curve(digits64, sigmas, Full(), outer=128, seed=3, progress=False)
    result = diagnose(OptimalDenoiser(digits64), digits64, sigmas, outer=128, seed=3,
                      draws="tilted", progress=False)  # fmt: skip
    assert result.paired and result.draws == "tilted"
    for p, c in zip(result.points, curve.points, strict=True):
        assert p.optimal_loss == pytest.approx(c.direct, rel=1e-12, abs=1e-300)
        assert abs(p.gap) <= Z * p.gap_stderr + ROUNDING * p.optimal_loss + 1e-15, p
    # J* is cached per draw: plain draws of the same (M, seed) are other values, not the file's
    plain = estimate_curve(digits64, sigmas, Full(), outer=128, seed=3, draws="plain",
                           progress=False)  # fmt: skip
    again = diagnose(OptimalDenoiser(digits64), digits64, sigmas, outer=128, seed=3,
                     progress=False)  # fmt: skip
    for p, c in zip(again.points, plain.points, strict=True):
        assert p.optimal_loss == pytest.approx(c.direct, rel=1e-12, abs=1e-300)


def test_a_denoiser_returning_its_input_has_loss_sigma_squared_on_tilted_draws(digits64):
    """D(x_t) = x_t has x0 loss σ²‖ε‖²/D, whose mean under ε ~ N(0, I) is exactly σ². Tilted ε
    are shifted toward neighbours (at σ = 0.05 their mean ‖ε‖²/D is above 3), so only the
    likelihood-ratio weights bring J_θ back to σ²: within Z of its s.e. at every σ."""
    from lossfloor.optimal.draws import OuterPlan, block_draws
    from lossfloor.optimal.pool_cache import PoolsByDtype

    sigmas = [0.05, 0.3, 1.0, 3.0]
    result = diagnose(lambda x, s, labels=None: x, digits64, sigmas, outer=1024, seed=3,
                      draws="tilted", progress=False)  # fmt: skip
    for p in result.points:
        assert abs(p.model_loss - p.sigma**2) <= Z * p.model_loss_stderr, p
        assert p.model_loss_stderr < 0.02 * p.sigma**2  # the check resolves a 6% bias
    plan = OuterPlan.build(digits64.x, None, 1024, 3, False)
    pools = PoolsByDtype(plan, torch.device("cpu"))
    from lossfloor.optimal.neighbours import neighbour_tables

    pools.attach(neighbour_tables(plan, pools(torch.float32), 8))
    eps, _ = block_draws(plan, pools(torch.float32), 0, 0.05, "tilted")
    assert eps.pow(2).mean().item() > 3  # unweighted, block 0 alone would give J_θ > 3σ²


def test_diagnose_refuses_plain_draws_against_a_tilted_estimate(tmp_path, capsys):
    est = _tilted_estimate(tmp_path, "1", outer=64)
    capsys.readouterr()
    line = one_line_error(capsys, ["diagnose", "--model", "optimal", "--data", "digits",
                                   "--limit", LIMIT, "--curve", str(est), "--draws", "plain",
                                   "--out", str(tmp_path / "d.json")])  # fmt: skip
    assert "--draws plain: the estimate used tilted draws" in line


@pytest.mark.slow
def test_default_diagnosis_grid_covers_the_schedules_default_range(tmp_path, run_dir, capsys):
    """Item 4: diagnose's default grid spans [0.002, 80], so schedule --gap keeps its default
    range, without a note."""
    est = _tilted_estimate(tmp_path, "0.01:100:7", outer=64)  # the grid is diagnose's here
    gap, sched = tmp_path / "g.json", tmp_path / "s.json"
    assert main(["diagnose", "--model", str(run_dir), "--data", "digits", "--limit", LIMIT,
                 "--outer", "16", "--quiet", "--out", str(gap)]) == 0  # fmt: skip
    sigmas = [p["sigma"] for p in json.loads(gap.read_text())["points"]]
    assert len(sigmas) == 16 and sigmas[0] == pytest.approx(0.002) and sigmas[-1] <= 80
    capsys.readouterr()
    assert main(["schedule", "--curve", str(est), "--gap", str(gap), "--out", str(sched)]) == 0
    assert "note" not in capsys.readouterr().err
    params = json.loads(sched.read_text())["params"]
    assert (params["sigma_min"], params["sigma_max"]) == (0.002, 80.0)


def test_gap_range_narrows_only_the_ends_not_given():
    assert gap_range([0.01, 1.0, 68.0]) == (0.01, 68.0)
    assert gap_range([0.001, 1.0, 100.0]) == (0.002, 80.0)
    assert gap_range([0.01, 1.0, 68.0], sigma_min=0.002) == (0.002, 68.0)
    assert gap_range([0.01, 68.0], None, 50.0) == (0.01, 50.0)
    assert gap_range([0.0020000000000000005, 79.99999999999997]) == (0.002, 80.0)  # a log grid
    assert (OptimalLossSchedule.sigma_min, OptimalLossSchedule.sigma_max) == (0.002, 80.0)


def test_schedule_refuses_a_gap_short_of_an_end_given(tmp_path, capsys):
    from lossfloor.diagnosis import Diagnosis, GapPoint

    est = _tilted_estimate(tmp_path, "0.002:100:9", outer=64)
    sha = Curve.load(est).dataset["sha256"]
    pts = tuple(GapPoint(sigma=s, model_loss=0.1, model_loss_stderr=0.0, optimal_loss=0.05,
                         optimal_loss_stderr=0.0, gap=0.05, gap_stderr=0.0, seconds=0.0)
                for s in (0.01, 1.0, 60.0))  # fmt: skip
    gap = tmp_path / "g.json"
    Diagnosis(points=pts, dataset={"sha256": sha}, outer=2, seed=0).save(gap)
    capsys.readouterr()
    argv = ["schedule", "--curve", str(est), "--gap", str(gap), "--sigma-min", "0.002",
            "--out", str(tmp_path / "s.json")]  # fmt: skip
    line = one_line_error(capsys, argv)
    assert "the gap must cover the training range [0.002, 60]" in line


@pytest.mark.slow
def test_relative_gap_is_null_where_the_table_prints_a_dash(tmp_path, run_dir, capsys):
    """Item 7: at σ = 0.002 J* ≈ 0 (< REL_FLOOR × its largest value): relative_gap is null in
    the JSON and empty in the CSV, as the table's "—"; elsewhere the three agree."""
    import csv

    out, table = tmp_path / "d.json", tmp_path / "d.csv"
    assert main(["diagnose", "--model", str(run_dir), "--data", "digits", "--limit", LIMIT,
                 "--sigmas", "0.002,1", "--outer", "64", "--out", str(out), "--csv",
                 str(table)]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()[1:3]
    points = json.loads(out.read_text())["points"]
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    low, high = points
    assert low["optimal_loss"] < REL_FLOOR * high["optimal_loss"] and low["gap"] > 0
    assert low["relative_gap"] is None and rows[0]["relative_gap [gap / optimal_loss]"] == ""
    assert printed[0].split()[-1] == "—"
    rel = high["gap"] / high["optimal_loss"]
    assert high["relative_gap"] == rel
    assert float(rows[1]["relative_gap [gap / optimal_loss]"]) == rel
    assert printed[1].split()[-1] == f"{rel:.3g}"
    assert np.isfinite(rel)
