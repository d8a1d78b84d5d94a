"""Hostile input through the CLI (issue 14): one line on stderr and exit 2 before any work, or
a correct value; never a traceback or a NaN."""

from __future__ import annotations

import json
import math

import pytest
from tolerances import sum_rtol

from lossfloor.cli import main

EST = ["estimate", "--data", "digits", "--limit", "100", "--quiet"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert exit 2 and a single stderr line; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lossfloor: error: "), err
    return lines[0]


def _commands(out: str) -> list[list[str]]:
    """Each command with one output path set to ``out`` (and inputs that would fail later)."""
    return [
        [*EST, "--sigmas", "1", "--out", out],
        [*EST, "--sigmas", "1", "--plot", out],
        ["diagnose", "--model", "missing-run", "--data", "digits", "--out", out],
        ["sample", "--run", "missing-run", "--n", "1", "--out-grid", out],
        ["sample", "--run", "missing-run", "--n", "1", "--out-npz", out],
        ["fid", "--samples", "missing.npz", "--data", "digits", "--out", out],
        ["data", "--data", "digits", "--json", out],
    ]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("kind", ["folder", "under-a-file"])
def test_bad_output_path_is_refused_before_any_work(tmp_path, capsys, case, kind):
    (tmp_path / "file").write_text("x")
    out = tmp_path if kind == "folder" else tmp_path / "file" / "out.json"
    argv = _commands(str(out))[case]
    line = one_line_error(capsys, argv)
    option = next(a for a in argv if a in {"--out", "--plot", "--out-grid", "--out-npz", "--json"})
    assert option in line and ("folder" in line or "is a file" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_a_failing_plot_still_writes_the_json(tmp_path, capsys, monkeypatch):
    import lossfloor.plots

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lossfloor.plots, "plot_optimal_loss", fail)
    out, png = tmp_path / "j.json", tmp_path / "j.png"
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--out", str(out), "--plot", str(png)])
    assert "--plot" in line and str(out) in line
    assert len(json.loads(out.read_text())["points"]) == 1 and not png.exists()


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (["--sigmas", "1e300"], "--sigmas", "must lie in"),
        (["--sigmas", "1e-200"], "--sigmas", "must lie in"),
        (["--sigmas", "2,1,1", "--total", "edm"], "--sigmas 1.0", "twice"),
        (["--sigmas", "1", "--seed", "-1"], "--seed -1", "≥ 0"),
        (["--sigmas", "1", "--tile-mb", "nan"], "--tile-mb nan", "finite"),
        (["--sigmas", "1", "--outer", "1000000000000"], "--outer", "memory"),
        (["--sigmas", "1e-30", "--dtype", "float32"], "--sigmas 1e-30", "float64"),
        (["--sigmas", "1", "--limit", "1"], "--outer:", "the dataset has 1 item"),
    ],
)
def test_extreme_estimate_options_are_one_line(tmp_path, capsys, args, option, words):
    out = tmp_path / "e.json"
    line = one_line_error(capsys, [*EST, *args, "--out", str(out)])
    assert option in line and words in line
    assert not out.exists() and not (tmp_path / "e.json.partial").exists()


@pytest.mark.parametrize("sigmas", ["1e-300", "1e400", "1e300"])
def test_diagnose_refuses_sigmas_beyond_the_float_range(tmp_path, capsys, sigmas):
    argv = ["diagnose", "--model", "optimal", "--data", "digits", "--limit", "50",
            "--sigmas", sigmas, "--out", str(tmp_path / "d.json")]  # fmt: skip
    assert "--sigmas" in one_line_error(capsys, argv)


@pytest.mark.numerics
def test_huge_and_tiny_sigma_give_the_limits_not_nan(tmp_path, capsys):
    """J*(σ → ∞) is the data variance; J*(σ → 0) is 0 (float32 overflows at 1e50: auto uses
    float64 there)."""
    out = tmp_path / "e.json"
    assert main([*EST, "--sigmas", "1e-100,1e50,1e100", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    tiny, big, huge = (p["optimal_loss"] for p in rec["points"])
    assert tiny == 0
    # A/D from the draws' forms (sums over the M draws and D elements) against the data's
    # variance (sums over the N rows): each to its sums' rounding (sum_rtol)
    n, d, m = rec["dataset"]["n"], math.prod(rec["dataset"]["shape"]), rec["estimator"]["outer"]
    rtol = sum_rtol(m + n + 2 * d)
    assert big == pytest.approx(rec["data_variance"], rel=rtol)
    assert huge == pytest.approx(rec["data_variance"], rel=rtol)


def test_data_near_the_float32_range_is_computed_in_float64(tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32) * 1e19
    np.save(tmp_path / "big.npy", x)
    out = tmp_path / "e.json"
    argv = ["estimate", "--data", str(tmp_path / "big.npy"), "--sigmas", "1e25", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["points"][0]["dtype"] == "float64"
    assert rec["points"][0]["optimal_loss"] == pytest.approx(rec["data_variance"], rel=1e-9)


def test_argparse_errors_carry_one_prefix(capsys):
    line = one_line_error(capsys, [*EST, "--sigmas"])
    assert line.count("lossfloor") == 2 and "lossfloor estimate --help" in line
    assert not line.startswith("lossfloor: error: lossfloor")


def _partial_of(capsys, tmp_path, monkeypatch, args: list[str]):
    """Interrupt an estimate with ``args`` after its first σ; return its --out path."""
    import lossfloor.optimal.estimate as estimate_module

    real, calls = estimate_module.per_sample_values, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "run.json"
    monkeypatch.setattr(estimate_module, "per_sample_values", flaky)
    assert main([*EST, *args, "--out", str(out)]) == 130
    monkeypatch.setattr(estimate_module, "per_sample_values", real)
    capsys.readouterr()
    return out


def test_a_partial_of_other_options_is_refused_unless_restart(tmp_path, capsys, monkeypatch):
    out = _partial_of(capsys, tmp_path, monkeypatch, ["--sigmas", "0.5,2", "--seed", "1"])
    partial = out.with_name("run.json.partial")
    before = partial.read_text()
    line = one_line_error(capsys, [*EST, "--sigmas", "0.5,2", "--seed", "2", "--out", str(out)])
    assert "--restart" in line and "other data or options" in line
    assert partial.read_text() == before and not out.exists()
    assert main([*EST, "--sigmas", "0.5,2", "--seed", "2", "--restart", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["estimator"]["seed"] == 2 and not partial.exists()


def test_resume_matches_sigma_within_a_relative_tolerance(tmp_path, capsys, monkeypatch):
    out = _partial_of(capsys, tmp_path, monkeypatch, ["--sigmas", "0.1,2"])
    rc = main(["estimate", "--data", "digits", "--limit", "100", "--sigmas",
               "0.10000000000000002,2", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0
    assert "resuming: 1 of 2 σ already computed" in err and "σ = 0.1)" in err


def test_a_malformed_partial_is_one_line(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.with_name("run.json.partial").write_text('["not", "a", "checkpoint"]')
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--out", str(out)])
    assert "is not a checkpoint" in line and "--restart" in line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny run on the first 24 digits."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    argv = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir),
            "--steps", "2", "--batch", "8", "--model", "tiny", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return run_dir


def test_diagnose_on_other_data_warns(tmp_path, capsys, monkeypatch, tiny_run):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    base = ["diagnose", "--model", str(tiny_run), "--data", "digits", "--sigmas", "1",
            "--outer", "16", "--quiet", "--out", str(tmp_path / "d.json")]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--limit", "24"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*base, "--limit", "30"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "trained on other data" in err


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line(tmp_path, capsys, tiny_run):
    import torch

    ckpt = torch.load(tiny_run / "checkpoint-latest.pt", weights_only=True)
    name = next(iter(ckpt["ema"]))
    ckpt["ema"][name] = torch.zeros(3, 1)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    argv = ["sample", "--run", str(bad), "--n", "1", "--out-npz", str(tmp_path / "s.npz")]
    assert "do not fit the model its config describes" in one_line_error(capsys, argv)
    assert not (tmp_path / "s.npz").exists()


def _read_only_folder(tmp_path) -> str:
    """A folder this process cannot write in: a chmod 555 one, or (as root, whom chmod does not
    stop) /proc/1, which even root cannot write; skip where neither exists."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder)
    if os.path.isdir("/proc/1") and not os.access("/proc/1", os.W_OK):
        return "/proc/1"
    pytest.skip("running as root without a folder root cannot write in (no /proc/1)")


def test_an_output_in_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys):
    out = f"{_read_only_folder(tmp_path)}/e.json"
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--out", out])
    assert (
        line.startswith(f"lossfloor: error: --out {out}: cannot write in") and "permission" in line
    )
