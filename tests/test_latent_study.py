"""experiments/latents/study.py (docs/latents.md) end to end on a tiny budget: pixels encoded by
a python callable into an EDM2 latent zip, the three J* readings, a training, both diagnoses,
the summary and the plot; a second run redoes nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lossfloor.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]

ENCODER = """
import torch

def pool(x):  # mean: 2×2 average per channel; std: |mean|/4 + 0.05 (it varies per element)
    m = torch.nn.functional.avg_pool2d(x, 2)
    return m, m.abs() / 4 + 0.05
"""


def _study(monkeypatch):
    """The script as a module (registered first: its dataclass looks its module up)."""
    spec = importlib.util.spec_from_file_location(
        "latent_study", ROOT / "experiments/latents/study.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "latent_study", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_tiny_study_runs_end_to_end_and_a_rerun_does_no_work(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = tmp_path / "img.npz"  # 50 images 1×8×8 → latents 1×4×4
    np.savez(pixels, x=rng.integers(0, 256, (50, 1, 8, 8), dtype=np.uint8),
             y=rng.integers(0, 3, 50))  # fmt: skip
    (tmp_path / "lf_study_encoder.py").write_text(ENCODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lf_study_encoder", raising=False)
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    study = _study(monkeypatch)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--budget", "tiny", "--pixels", str(pixels), "--vae", "python:lf_study_encoder:pool",
            "--work", str(work), "--out", str(out), "--quiet"]  # fmt: skip
    study.main(argv)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 50 and (work / "fmnist-latents.zip").exists()
    sampled = np.load(work / "sampled.npz")
    assert sampled["x"].shape == (50, 1, 4, 4)
    # one unit for all three readings: the EDM2 transform gives each channel of the sampled
    # latents mean 0 and std 0.5, pooled over items and positions (these 50 items are the
    # statistics' items; 1e-5: the transform's 6 significant digits and float32)
    t = summary["transform"]
    ds = load_dataset(str(work / "fmnist-latents.zip"), latent_scale=[float(t["latent_scale"])],
                      latent_bias=[float(t["latent_bias"])])  # fmt: skip
    m, s = ds.x.double(), ds.std.double()
    assert abs(float(m.mean())) < 1e-5
    assert np.isclose(float(m.var(unbiased=False) + s.square().mean()), 0.25, rtol=1e-5)
    curves = summary["curves"]
    # J*(σ → ∞) of the mixture is the total variance per element, of the means the means' alone
    total = summary["variance_of_means"] + summary["mean_posterior_variance"]
    assert np.isclose(curves["mixture"]["data_variance"], total, rtol=1e-6)
    assert np.isclose(curves["means"]["data_variance"], summary["variance_of_means"], rtol=1e-6)
    # (a) below: mean(s²σ²/(s²+σ²)) ≤ J* ≤ σ² (knowing the item; the identity denoiser), within
    # 4 standard errors of the estimate
    assert all(p["within_bounds"] for p in summary["small_sigma"])
    rows = (out / "gaps.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 4  # mixture, means and the latent loss vs (b), 4 σ each
    assert (out / "latents.png").stat().st_size > 0

    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def no_work(argv):
        raise AssertionError(f"the rerun ran lossfloor {argv}")

    monkeypatch.setattr(study, "run_cli", no_work)
    monkeypatch.setattr(study, "summarise", no_work)
    study.main(argv)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
