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

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


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


BROKEN_OUTPUTS = """
import torch


class Broken(torch.nn.Module):
    sigma_min, sigma_max, img_channels, img_resolution = 0.002, 80.0, 1, 8

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x, sigma, class_labels=None):
        if self.how == "nan":  # NaN from σ < 1 on: diagnose and sample reach it
            return torch.where(sigma.reshape(-1, 1, 1, 1) < 1, float("nan"), x)
        if self.how == "shape":
            return x[:, :, :2]
        return x.tolist()


def nan():
    return Broken("nan")


def shape():
    return Broken("shape")


def listed():
    return Broken("list")
"""


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("nan", "the model's output is not finite at σ = "),
        ("shape", "the model's output has shape (48, 1, 2, 8) for an input of shape (48, 1, 8, 8)"),
        ("listed", "the model returned a list, not a tensor of images shaped like its input"),
    ],
)
def test_a_model_output_of_nan_or_the_wrong_shape_is_refused_and_nothing_written(
    tmp_path, monkeypatch, capsys, factory, message
):
    """diagnose and sample both refuse it in one line (exit 2) through ``as_denoiser``'s check,
    and write nothing."""
    module = "lf_broken_outputs"
    (tmp_path / f"{module}.py").write_text(BROKEN_OUTPUTS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    spec = f"python:{module}:{factory}"
    outs = [tmp_path / name for name in ("d.json", "d.csv", "s.npz", "s.png")]
    runs = [
        ["diagnose", "--data", "digits", "--limit", "24", "--model", spec, "--sigmas", "0.3,2",
         "--outer", "48", "--quiet", "--out", str(outs[0]), "--csv", str(outs[1])],
        ["sample", "--model", spec, "--n", "48", "--steps", "4", "--no-progress",
         "--out-npz", str(outs[2]), "--out-grid", str(outs[3])],
    ]  # fmt: skip
    try:
        for argv in runs:
            assert lossfloor.cli.main(argv) == 2, argv[0]
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
    finally:
        sys.modules.pop(module, None)
    assert not any(p.exists() for p in outs)


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
