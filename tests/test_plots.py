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
                    offset=offset_fit(x, loss, optimal_loss), n=x.size,
                    x=tuple(x), loss=tuple(loss))  # fmt: skip


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


# ----- issue 21: axes in, axes out; no backend chosen by the library --------------------------
def _axes(count: int) -> list:
    """``count`` axes of a bare Figure (no pyplot, no backend)."""
    from matplotlib.figure import Figure

    return list(Figure().subplots(1, count, squeeze=False).ravel())


def _curve():
    from lossfloor.optimal import Curve, CurvePoint

    pts = tuple(
        CurvePoint(sigma=s, optimal_loss=v, stderr=v / 100)
        for s, v in ((0.1, 1e-4), (1.0, 0.05), (10.0, 0.2))
    )
    return Curve(points=pts, estimator={"name": "full"}, data_variance=0.25)


def test_curve_plot_draws_its_line_and_the_data_variance_on_the_given_axes():
    (ax,) = _axes(1)
    assert _curve().plot(ax, title="t") is ax
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"full", "data variance (σ→∞)"}
    assert lines["full"].get_xdata().tolist() == [0.1, 1.0, 10.0]
    assert len(ax.collections) == 1 and ax.get_title() == "t"  # the ±2 s.e. band


def test_diagnosis_plot_draws_both_losses_and_the_gap_on_the_two_given_axes():
    from lossfloor.diagnosis import Diagnosis

    result = Diagnosis.load("docs/results/fmnist-diagnosis.json")
    axes = _axes(2)
    assert result.plot(axes) == axes
    labels = [ln.get_label() for ln in axes[0].get_lines()]
    assert labels[:2] == ["model J_θ(σ)", "optimal J*(σ)"]
    assert len(axes[0].get_lines()[0].get_xdata()) == len(result.points)
    (gap,) = axes[1].containers  # the error bars of the gap
    assert gap.lines[0].get_ydata().tolist() == [p.gap for p in result.points]


@pytest.mark.slow
def test_floor_plot_draws_the_bracket_and_the_n_trend_on_the_two_given_axes():
    result = Floor.load("docs/results/fmnist-floor.json")
    axes = _axes(2)
    assert result.plot(axes) == axes
    labels = axes[0].get_legend_handles_labels()[1]
    sizes = [q.n for q in result.points[0].by_n]
    assert [f"J* of n = {n}" for n in sizes] == labels[: len(sizes)]
    assert "least held-out bound" in labels and "extrapolated J*_∞" in labels
    trend = [p for p in result.points if p.by_n[-1].optimal_loss > 0 and p.verdict != "memorised"]
    assert len(axes[1].get_lines()) == len(trend) + 1  # one per σ, and the line at 1


def test_scaling_plot_draws_one_panel_per_fit_and_turns_spare_axes_off():
    result = ScalingFit(x="flops", fits=(_fit(1.0, 0.01), _fit(10.0, 0.3)))
    axes = _axes(3)
    assert result.plot(axes) == axes
    assert [ax.get_title() for ax in axes[:2]] == ["σ = 1", "σ = 10"]
    assert all(len(ax.get_lines()) == 4 for ax in axes[:2])  # runs, two fits, J*
    assert axes[0].axison and not axes[2].axison
    with pytest.raises(ValueError, match="2 panels"):
        result.plot(axes[:1])


def test_schedule_plot_draws_w_j_and_the_density_on_the_given_axes():
    from lossfloor.optimal import Curve
    from lossfloor.schedules.optimal import OptimalLossSchedule

    curve = Curve.load("docs/results/fmnist-full.json")  # reaches σ_max = 80
    (ax,) = _axes(1)
    assert OptimalLossSchedule.from_curve(curve).plot(ax) is ax
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels[:2] == ["weight w(σ)", "optimal loss J*(σ)"] and labels[2].startswith("σ* =")
    (twin,) = [other for other in ax.figure.axes if other is not ax]  # the density's axis
    assert [ln.get_label() for ln in twin.get_lines()] == ["density of ln σ, p"]


# A fresh interpreter with a backend that is not Agg: importing the plots and drawing every
# result (on given axes, on its own pyplot figure, and to PNG files) leaves the backend as set,
# and matplotlib.use is never called (it raises here).
_NO_BACKEND = """
import sys
import matplotlib

def refuse(*args, **kwargs):
    raise AssertionError("matplotlib.use called")

matplotlib.use = refuse
before = matplotlib.get_backend()
import lossfloor.plots as plots
assert "matplotlib.pyplot" not in sys.modules, "importing the plots imported pyplot"
from matplotlib.figure import Figure
from lossfloor.diagnosis import Diagnosis
from lossfloor.optimal import Curve
curve = Curve.load("docs/results/fmnist-full.json")
diagnosis = Diagnosis.load("docs/results/fmnist-diagnosis.json")
curve.plot(Figure().subplots())
plots.plot_optimal_loss(sys.argv[1] + "/c.png", [("full", curve)])
plots.plot_diagnosis(sys.argv[1] + "/d.png", diagnosis)
assert "matplotlib.pyplot" not in sys.modules, "a PNG or given axes used pyplot"
ax = curve.plot()  # no axes: a pyplot figure of the current backend
import matplotlib.pyplot as plt
assert plt.get_fignums() == [ax.figure.number]
assert matplotlib.get_backend() == before == "svg", (before, matplotlib.get_backend())
print("ok")
"""


@pytest.mark.slow
def test_importing_and_drawing_the_plots_keeps_the_backend_the_user_chose(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": "src"}
    proc = subprocess.run([sys.executable, "-c", _NO_BACKEND, str(tmp_path)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    for name in ("c.png", "d.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


_CLI_BACKEND = """
import sys
from lossfloor.cli import main
rc = main(["schedule", "--curve", sys.argv[1] + "/missing.json", "--out", sys.argv[1] + "/s.json"])
import os
import matplotlib
print(rc, os.environ.get("MPLBACKEND"), matplotlib.get_backend())
"""


@pytest.mark.slow
@pytest.mark.parametrize(("chosen", "expected"), [(None, "agg"), ("svg", "svg")])
def test_the_cli_makes_agg_the_default_backend_and_keeps_one_chosen(tmp_path, chosen, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env |= {"PYTHONPATH": "src"} | ({"MPLBACKEND": chosen} if chosen else {})
    proc = subprocess.run([sys.executable, "-c", _CLI_BACKEND, str(tmp_path)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.stdout.split() == ["2", expected, expected], proc.stderr  # 2: no curve
