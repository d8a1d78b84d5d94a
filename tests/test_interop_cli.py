"""``--model python:MODULE:CALLABLE``: any denoiser from the command line, for diagnose and
sample, loaded like a run directory and refused in one line when it cannot be."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

import lossfloor.cli
from lossfloor.data import load_dataset
from lossfloor.training import TrainConfig, train

MODULE = "lf_user_model"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    config = TrainConfig(steps=2, batch=8, model="tiny", warmup=0)
    train(config, load_dataset("digits", limit=24), path, progress=False)
    return path


@pytest.fixture
def user_module(run_dir, tmp_path, monkeypatch):
    """A module in the current directory (not on sys.path) with factories good and bad."""
    (tmp_path / f"{MODULE}.py").write_text(
        textwrap.dedent(f"""
        from lossfloor.models import load_run

        def make():
            return load_run({str(run_dir)!r})[0]

        def broken():
            raise RuntimeError("boom")

        def plain():
            return lambda x, sigma, labels=None: x

        def number():
            return 3
    """)
    )
    monkeypatch.chdir(tmp_path)
    yield f"python:{MODULE}"
    sys.modules.pop(MODULE, None)


def test_a_python_model_diagnoses_like_its_run_directory(run_dir, user_module, tmp_path):
    common = ["diagnose", "--data", "digits", "--limit", "24", "--sigmas", "0.3,2,20",
              "--outer", "48", "--no-cache", "--quiet"]  # fmt: skip
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert lossfloor.cli.main([*common, "--model", f"{user_module}:make", "--out", str(a)]) == 0
    assert lossfloor.cli.main([*common, "--model", str(run_dir), "--out", str(b)]) == 0
    pa, pb = (json.loads(p.read_text()) for p in (a, b))
    assert pa["model"]["kind"] == "python" and pb["model"]["kind"] == "lossfloor-run"
    keys = ("sigma", "model_loss", "optimal_loss", "gap", "gap_stderr", "loss_factor")
    for x, y in zip(pa["points"], pb["points"], strict=True):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}


def test_a_python_model_samples_like_its_run_directory(run_dir, user_module, tmp_path):
    common = ["sample", "--n", "3", "--steps", "4", "--seed", "5", "--no-progress"]
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    argv = [*common, "--model", f"{user_module}:make", "--out-npz", str(a)]
    assert lossfloor.cli.main(argv) == 0
    assert lossfloor.cli.main([*common, "--run", str(run_dir), "--out-npz", str(b)]) == 0
    with np.load(a) as fa, np.load(b) as fb:
        assert np.array_equal(fa["x"], fb["x"]) and fa["x"].shape == (3, 1, 8, 8)
        meta = json.loads(str(fa["meta"]))
    assert (meta["sigma_max"], meta["sigma_min"]) == (80.0, 0.002)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("python:lf_no_such_module:make", "no module named 'lf_no_such_module'"),
        (f"python:{MODULE}:missing", "has no attribute 'missing'"),
        (f"python:{MODULE}:broken", "broken() raised RuntimeError: boom"),
        (f"python:{MODULE}:plain", "lacks the denoiser protocol"),
        (f"python:{MODULE}:number", "an object of type int is not a denoiser"),
        (f"python:{MODULE}", "expected python:MODULE:CALLABLE"),
    ],
)
def test_bad_python_models_are_one_line_errors(user_module, tmp_path, capsys, factory, message):
    out = tmp_path / "d.json"
    argv = ["diagnose", "--data", "digits", "--limit", "24", "--model", factory, "--out", str(out)]
    assert lossfloor.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_sigma_outside_the_model_range_is_refused(run_dir, tmp_path, capsys):
    g = str(tmp_path / "g.png")
    cases = [
        (["sample", "--run", str(run_dir), "--n", "1", "--sigma-min", "0.001", "--out-grid", g],
         "--sigma-min 0.001: outside the model's range [0.002, 80]"),
        (["sample", "--run", str(run_dir), "--n", "1", "--churn", "-1", "--out-grid", g],
         "--churn -1.0: must be a number >= 0"),
        (["diagnose", "--data", "digits", "--limit", "24", "--model", str(run_dir),
          "--sigmas", "0.5,100", "--out", str(tmp_path / "d.json")],
         "--sigmas 100.0: outside the model's range [0.002, 80]"),
    ]  # fmt: skip
    for argv, message in cases:
        assert lossfloor.cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.png").exists()
