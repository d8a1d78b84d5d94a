"""GapTracker against ``lossfloor diagnose`` on the same trained model, and the example script.

A tiny ε-prediction UNet2DModel is trained with DDPMScheduler in the plain loop of
examples/diffusers_unconditional.py on digits; the same loop then runs on with the weights
frozen (lr = 0: the loop's own losses, of the model diagnose sees) and feeds the tracker; the
model is saved as a diffusers UNet + scheduler and diagnosed at the tracker's rows' σ."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import lossfloor
from lossfloor.models import load_diffusers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "diffusers_unconditional.py"
BINS = 8


def example_module():
    spec = importlib.util.spec_from_file_location("diffusers_unconditional", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tracker_gap_agrees_with_diagnose_within_the_combined_standard_errors(tmp_path, one_thread):
    from diffusers import DDPMScheduler

    ex = example_module()
    data = lossfloor.load_dataset("digits")
    sigmas = np.exp(np.linspace(math.log(0.01), math.log(160.0), 2 * BINS + 1)).tolist()
    curve = lossfloor.estimate_curve(data, sigmas, "full", outer=512, seed=0, progress=False)
    torch.manual_seed(0)
    unet, scheduler = ex.make_unet(1, 8, widths=(16, 32)), DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    ex.train(unet, scheduler, data.x, 100, batch=64, generator=g)
    unet.eval()
    tracker = lossfloor.GapTracker(curve, scheduler=scheduler, data=data, bins=BINS,
                                   half_life=math.inf)  # fmt: skip
    wrong = lossfloor.GapTracker(curve, process=tracker.process, target="x0", bins=BINS)
    with torch.no_grad():
        ex.train(unet, scheduler, data.x, 12, batch=512, lr=0.0, tracker=tracker, generator=g)
    rows = [r for r in tracker.summary() if r["gap"] is not None]
    assert len(rows) == BINS and min(r["count"] for r in rows) >= 20

    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "scheduler")
    model, _ = load_diffusers(tmp_path)
    at = [r["sigma"] for r in rows]
    diagnosis = lossfloor.diagnose(model, data, at, outer=1024, seed=1, progress=False,
                                   cache=False)  # fmt: skip
    # The tracker's gap is J_θ on the loop's draws minus the curve's J*; diagnose's is J_θ − J*
    # on its own draws (paired). Both estimate J_θ(σ) − J*(σ): their difference has s.e.
    # √(se_tracker² + se_diagnose² + se_curve(σ)²) (independent draws; the curve's s.e.
    # interpolated in ln σ). Bound: z = Φ⁻¹(1 − 0.01/(2·8)) = 3.23, a 1% family-wise chance of
    # failing for a correct tracker across the 8 bins.
    z = stats.norm.ppf(1 - 0.01 / (2 * BINS))
    se_curve = np.interp(np.log(at), np.log(curve.sigmas), curve.stderrs)
    for row, point, se_c in zip(rows, diagnosis.points, se_curve, strict=True):
        combined = math.sqrt(row["gap_stderr"] ** 2 + point.gap_stderr**2 + se_c**2)
        assert abs(row["gap"] - point.gap) <= z * combined, (row, point.gap, combined)
        assert point.gap > 5 * point.gap_stderr  # a gap that is there to agree with
    # the test has power: ε losses read as x0 losses (no loss factor) are far off somewhere
    with torch.no_grad():
        g2 = torch.Generator().manual_seed(5)
        ex.train(unet, scheduler, data.x, 4, batch=512, lr=0.0, tracker=wrong, generator=g2)
    off = [
        abs(w["gap"] - p.gap) / math.sqrt(w["gap_stderr"] ** 2 + p.gap_stderr**2)
        for w, p in zip(wrong.summary(), diagnosis.points, strict=True)
    ]
    assert max(off) > 10


def test_the_example_runs_and_writes_tensorboard_events(tmp_path, one_thread):
    """examples/diffusers_unconditional.py for a few steps on 64 digits (its curve estimated
    there): the gap and ratio scalars and the gap image are in the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ex = example_module()
    ex.main(["--limit", "64", "--steps", "4", "--batch", "8", "--log-every", "2",
             "--logdir", str(tmp_path)])  # fmt: skip
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert any(t.startswith("lossfloor/gap/sigma=") for t in tags["scalars"])
    assert any(t.startswith("lossfloor/ratio/sigma=") for t in tags["scalars"])
    assert "lossfloor/gap_vs_sigma" in tags["images"]
    assert [s.step for s in events.Scalars("loss")] == [2, 4]
    assert (tmp_path / "curve.json").exists()
