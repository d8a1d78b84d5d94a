"""Plots: what the figures show (axes limits, titles, legend entries), read from the returned
figure."""

from __future__ import annotations

import numpy as np
import pytest

from lossfloor.floor import Floor
from lossfloor.io import read_json
from lossfloor.plots import NEGLIGIBLE_OPTIMAL, plot_floor, plot_scaling
from lossfloor.scaling import ScalingFit, SigmaFit, offset_fit, power_law_fit


def _fit(sigma: float, optimal_loss: float) -> SigmaFit:
    x = np.geomspace(1e12, 1e15, 6)
    loss = optimal_loss + 0.5 * (x / 1e12) ** -0.3
    return SigmaFit(sigma=sigma, optimal_loss=optimal_loss, raw=power_law_fit(x, loss),
                    subtracted=power_law_fit(x, loss, optimal_loss),
                    offset=offset_fit(x, loss, optimal_loss), x=tuple(x),
                    loss=tuple(loss))  # fmt: skip


@pytest.mark.slow
def test_scaling_panels_with_j_star_near_zero_keep_the_axis_on_the_data_and_say_so(tmp_path):
    # σ = 0.05 of the issue: J* = 7e-37 (a memorising optimum); σ = 10: J* = 0.3, a third of
    # the smallest loss, drawn and inside the axis
    fits = (_fit(0.05, 7e-37), _fit(10.0, 0.3))
    fig = plot_scaling(tmp_path / "s.png", ScalingFit(x="flops", fits=fits))
    tiny, real = fig.axes[:2]
    lowest = 0.5 * 1e3**-0.3  # the smallest loss of the σ = 0.05 panel
    assert tiny.get_ylim()[0] > NEGLIGIBLE_OPTIMAL * lowest
    assert "J* ≈ 0" in tiny.get_title()
    assert "J*" not in tiny.get_legend_handles_labels()[1]
    assert real.get_ylim()[0] <= 0.3 and "J* ≈ 0" not in real.get_title()
    assert "J*" in real.get_legend_handles_labels()[1]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_floor_plot_marks_lower_above_upper_within_error(tmp_path):
    # the committed Fashion-MNIST floor: lower > upper at σ = 20.9, 40.9 and 80, within error
    result = Floor.from_json(read_json("docs/results/fmnist-floor.json"))
    crossed = [p.sigma for p in result.points if p.crossing is not None]
    assert len(crossed) == 3 and all(p.crossing != "beyond error" for p in result.points)
    labels = plot_floor(tmp_path / "f.png", result).axes[0].get_legend_handles_labels()[1]
    assert "lower > upper, within error" in labels
    assert "lower > upper, beyond error" not in labels
