"""`lossfloor estimate`: the JSON contract, resume, and bad input → one line, exit 2."""

from __future__ import annotations

import json

import pytest

import lossfloor.optimal.estimate as estimate_module
from lossfloor.cli import main

BASE = ["estimate", "--data", "digits", "--limit", "200", "--quiet"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([*BASE, *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_json_contract_and_plot(tmp_path, capsys):
    out, png = tmp_path / "j.json", tmp_path / "j.png"
    rc, _, err = run_cli(capsys, "--sigmas", "0.1:10:5", "--total", "edm", "--out", str(out),
                         "--plot", str(png))  # fmt: skip
    assert rc == 0, err
    rec = json.loads(out.read_text())
    assert set(rec["dataset"]) >= {"name", "n", "shape", "sha256", "conditional", "xflip"}
    assert rec["dataset"]["n"] == 200 and rec["dataset"]["shape"] == [1, 8, 8]
    assert rec["process"]["name"] == "edm" and rec["target"]["name"] == "F"
    assert set(rec["estimator"]) >= {"name", "inner", "C", "outer", "seed"}
    assert rec["per_element"] is True
    assert 0 < rec["data_variance"] < 1
    assert len(rec["points"]) == 5
    for p in rec["points"]:
        assert set(p) >= {"sigma", "t", "optimal_loss", "stderr", "optimal_loss_target", "seconds"}
        # EDM: t = σ and the F loss is λ(σ)·J*
        lam = (p["sigma"] ** 2 + 0.25) / (p["sigma"] * 0.5) ** 2
        assert p["t"] == pytest.approx(p["sigma"])
        assert p["optimal_loss_target"] == pytest.approx(lam * p["optimal_loss"], rel=1e-12)
    assert set(rec["total"]) >= {"schedule", "optimal_loss", "stderr"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infinite_C_is_recorded_in_valid_json(tmp_path, capsys):
    out = tmp_path / "snis.json"
    rc, _, err = run_cli(capsys, "--sigmas", "1", "--estimator", "cdol", "--inner", "20",
                         "--C", "inf", "--out", str(out))  # fmt: skip
    assert rc == 0, err
    assert json.loads(out.read_text())["estimator"]["C"] == "inf"


def test_target_units_follow_the_process(tmp_path, capsys):
    out = tmp_path / "fm.json"
    rc, _, err = run_cli(capsys, "--sigmas", "0.5,2", "--process", "fm", "--target", "velocity",
                         "--out", str(out))  # fmt: skip
    assert rc == 0, err
    for p in json.loads(out.read_text())["points"]:
        t = p["sigma"] / (1 + p["sigma"])  # rectified flow: σ̃ = t/(1−t), velocity factor 1/t²
        assert p["t"] == pytest.approx(t)
        assert p["optimal_loss_target"] == pytest.approx(p["optimal_loss"] / t**2, rel=1e-10)


def test_the_file_records_its_provenance_and_round_trips_byte_for_byte(tmp_path, capsys):
    """``--out`` holds the provenance of the run (``provenance.describe_run``): the command as
    given, the torch version; ``Curve.load`` keeps it, so the file saves back byte for byte,
    and a file without it (written before it was recorded) still loads, without one."""
    import shlex

    import torch

    from lossfloor.optimal import Curve

    out = tmp_path / "j.json"
    argv = [*BASE, "--sigmas", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    run = rec["provenance"]
    assert list(rec)[-1] == "provenance"
    assert shlex.split(run["command"]) == ["lossfloor", *argv]
    assert run["torch"] == torch.__version__
    assert run["seconds"] >= 0 and run["started"] <= run["finished"]
    curve = Curve.load(out)
    assert curve.provenance == run
    curve.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == out.read_bytes()
    del rec["provenance"]
    (tmp_path / "old.json").write_text(json.dumps(rec))
    assert Curve.load(tmp_path / "old.json").provenance is None
    assert "provenance" not in Curve.load(tmp_path / "old.json").to_json()


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_file(tmp_path, capsys, monkeypatch):
    args = ["--sigmas", "0.2:5:5", "--estimator", "cdol", "--inner", "40", "--seed", "3"]
    ref = tmp_path / "ref.json"
    assert run_cli(capsys, *args, "--out", str(ref))[0] == 0

    out = tmp_path / "run.json"
    real = estimate_module.per_sample_values
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(estimate_module, "per_sample_values", flaky)
    assert run_cli(capsys, *args, "--out", str(out))[0] == 130
    assert not out.exists()
    assert len(json.loads((tmp_path / "run.json.partial").read_text())["done"]) == 2
    monkeypatch.setattr(estimate_module, "per_sample_values", real)
    rc, _, err = run_cli(capsys, *args, "--out", str(out))
    assert rc == 0, err
    assert not (tmp_path / "run.json.partial").exists()

    def strip(rec):  # the timings and the provenance (command, times) are the run's own
        for p in rec["points"]:
            p.pop("seconds")
        rec.pop("provenance")
        return rec

    assert strip(json.loads(out.read_text())) == strip(json.loads(ref.read_text()))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--estimator", "cdol", "--inner", "500"], "exceeds the number of data points"),
        (["--estimator", "dol", "--inner", "1"], "at least 2"),
        (["--estimator", "cdol", "--inner", "20", "--C", "0"], "must be > 0"),
        (["--estimator", "cdol", "--inner", "20", "--C", "-3"], "must be > 0"),
        (["--outer", "0"], "outer"),
        (["--sigmas", ""], "no σ given"),
        (["--sigmas", "0.1,0,1"], "> 0"),
        (["--sigmas=-1:1:4"], "> 0"),
        (["--sigmas", "abc"], "expected a comma-separated list"),
        (["--process", "warp"], "unknown process"),
        (["--target", "banana"], "unknown target"),
        (["--estimator", "magic"], "unknown estimator"),
        (["--total", "nope"], "--total nope: expected one of edm"),
        (["--conditional", "--data", "/nonexistent.npz"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    rc, stdout, err = run_cli(capsys, *args, "--out", str(out))
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message.lower() in err.lower(), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())
