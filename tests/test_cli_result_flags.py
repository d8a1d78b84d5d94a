"""Issue 27, items 8 and 9 through the command line: no number in an estimate's JSON is
meaningless. ESS 0 is never "resolved"; a negative closed form is recorded with the weight
the combination gave it and its rounding bound, and J* itself is never negative."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lossfloor.cli import main


def _estimate(tmp_path, capsys, *args: str) -> list[dict]:
    out = tmp_path / "c.json"
    assert main(["estimate", *args, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())["points"]


@pytest.mark.parametrize("draws", ["tilted", "plain"])
def test_an_estimate_with_no_effective_draw_is_never_resolved(tmp_path, capsys, draws):
    """Two points 2 apart in 16 dims at σ = 0.02 (the other point 50 σ away): no draw, tilted
    or not, puts a representable weight on the other point, so every draw's value is 0 and the
    effective number of draws carrying J* is 0."""
    x = np.zeros((2, 16), np.float64)
    x[:, 0] = [1.0, -1.0]
    np.save(tmp_path / "two.npy", x)
    args = ["--data", str(tmp_path / "two.npy"), "--sigmas", "0.02,0.5", "--outer", "2048"]
    points = _estimate(tmp_path, capsys, *args, "--estimator", "full", "--draws", draws)
    low = points[0]
    assert low["ess"] == 0.0 and low["resolved"] is False
    assert points[1]["ess"] > 30 and points[1]["resolved"] is True


def test_a_negative_closed_form_is_recorded_with_its_weight_and_bound_never_as_j(tmp_path, capsys):
    """300 digits, float32, tilted draws, M = N: at σ ≈ 0.3–0.4 the closed form A − ‖μ‖²
    comes out negative (its variance under the tilted weights is large). The JSON keeps it
    beside the weight the minimum-variance combination gave it and its rounding bound; J* is
    the combination, never negative."""
    points = _estimate(tmp_path, capsys, "--data", "digits", "--limit", "300", "--sigmas",
                       "0.3,0.38", "--outer", "300", "--dtype", "float32")  # fmt: skip
    negative = [p for p in points if p["closed"] < 0]
    assert negative, points  # the case exists on this data: the test is not vacuous
    for p in points:
        w = p["combined_weight_closed"]
        assert 0.0 <= w <= 1.0 and p["optimal_loss"] >= 0.0
        assert p["closed_rounding"] is not None and p["closed_rounding"] > 0.0
        combined = w * p["closed"] + (1.0 - w) * p["direct"]
        # the recorded value is the combination (clipped at 0), up to float64 rounding
        assert p["optimal_loss"] == pytest.approx(max(combined, 0.0), rel=1e-9, abs=1e-15)
