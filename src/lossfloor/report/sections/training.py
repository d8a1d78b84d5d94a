"""A training run's section: the x0 loss against the step, overall and per σ bin, the
monitor's gap where it logged one, and the last values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lossfloor.report.inputs import Input, describe_data, json_text
from lossfloor.report.sections.common import (
    UNITS,
    Section,
    bare_figure,
    duration,
    g,
    run_provenance,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from lossfloor.training.stats import StatsRecord


def training_section(item: Input, index: int) -> Section:
    """The x0 loss against the step, overall and per σ bin; the last values."""
    from lossfloor.training.stats import SIGMA_BIN_EDGES

    records: list[StatsRecord] = item.result
    fig, axes = bare_figure(2, 1, (7.5, 8.0))
    steps = np.array([r.step for r in records])
    axes[0].plot(steps, [r.loss_x0 for r in records], color="k", label="x0 loss, all σ")
    for k in range(len(SIGMA_BIN_EDGES) - 1):
        v = np.array([np.nan if r.bin_loss_x0[k] is None else r.bin_loss_x0[k] for r in records])
        if np.isfinite(v).any():
            lo, hi = SIGMA_BIN_EDGES[k], SIGMA_BIN_EDGES[k + 1]
            axes[0].plot(steps, v, lw=0.8, label=f"σ ∈ ({lo:.2g}, {hi:.2g}]")
    axes[0].set(yscale="log", xlabel="training step", ylabel="x0 loss per element",
                title="training loss by σ bin")  # fmt: skip
    axes[0].legend(fontsize=6)
    gaps = [r.extra.get("gap") for r in records]
    if any(isinstance(x, dict) for x in gaps):
        _draw_gap(axes[1], steps, gaps)
    else:
        axes[1].plot(steps, [r.loss for r in records], color="C0")
        axes[1].set(xlabel="training step", ylabel="minimised loss", title="training objective")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    last = records[-1]
    text = [
        f"{len(records)} log records up to step {last.step:,} ({last.images:,} images, "
        f"{duration(last.seconds)} of training); the x0 loss went from {g(records[0].loss_x0)} to "
        f"{g(last.loss_x0)}."
    ]
    if isinstance(last.extra.get("gap"), dict):
        gap = last.extra["gap"]
        text.append(
            "At the last record the monitor's gap to J* is "
            + ", ".join(f"{g(v)} at σ = {k}" for k, v in gap.items())
            + ": a gap that still falls means training is not done."
        )
    text.append(UNITS)
    prov = {"file": item.path, "kind": "training stats"}
    if item.config is not None:
        prov["data"] = describe_data(item.dataset)
        prov["config"] = json_text({k: v for k, v in item.config.items() if k != "data"})
    prov.update(run_provenance(item, last.seconds))
    alt = "training loss against step, by σ bin"
    summary = f"Training run {index}: " + text[0]
    return Section(f"training-{index}", f"Training run {index}", fig, text, prov, alt,
                   summary=summary)  # fmt: skip


def _draw_gap(ax: Axes, steps: np.ndarray, gaps: list[Any]) -> None:
    """The monitor's gap per σ against the step."""
    keys = sorted({k for x in gaps if isinstance(x, dict) for k in x}, key=float)
    for k in keys:
        v = [x.get(k, np.nan) if isinstance(x, dict) else np.nan for x in gaps]
        ax.plot(steps, v, label=f"σ = {k}")
    ax.set(yscale="log", xlabel="training step", ylabel="gap J_θ − J*", title="monitored gap")
    ax.legend(fontsize=7)
