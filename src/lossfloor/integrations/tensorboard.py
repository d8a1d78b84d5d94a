"""TensorBoard: the tracker's per-bin gap and ratio as scalars and the gap against σ as an image.

    from torch.utils.tensorboard import SummaryWriter
    from lossfloor.integrations.tensorboard import log_tensorboard

    writer = SummaryWriter("runs/x")
    ...                                  # in the loop, after tracker.update(...)
    if step % 100 == 0:
        log_tensorboard(writer, tracker, step)

The figure is drawn on a bare matplotlib ``Figure`` rendered by the Agg canvas (no pyplot, no
backend chosen) and written with ``add_image``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossfloor.tracker import GapTracker


def gap_image(rows: list[dict[str, Any]], title: str = "") -> np.ndarray:
    """The gap ± 2 s.e. against σ (log axis) of ``GapTracker.summary()`` rows, as an RGB array
    (H×W×3, uint8)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kept = [r for r in rows if r["gap"] is not None]
    s = [r["sigma"] for r in kept]
    gap = [r["gap"] for r in kept]
    err = [2 * r["gap_stderr"] if r["gap_stderr"] is not None else 0.0 for r in kept]
    ax.errorbar(s, gap, yerr=err, marker="o", ms=3, lw=1, capsize=2)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("σ (VE)")
    ax.set_ylabel("gap J_θ − J* (x0 units)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_tensorboard(
    writer: Any, tracker: GapTracker, step: int, prefix: str = "lossfloor/", image: bool = True
) -> dict[str, float]:
    """Write ``tracker.log_dict(prefix)`` as scalars (``writer.add_scalar``) and, with
    ``image``, the gap against σ (``{prefix}gap_vs_sigma``, ``add_image``). A tracker built with
    ``reduce`` sums over the processes here: call it on every process; only the writer of
    rank 0 needs to exist (pass None elsewhere). Returns the values logged."""
    rows = tracker.summary()
    values = tracker.log_dict(prefix, rows)
    if writer is None:
        return values
    for key, value in values.items():
        if math.isfinite(value):
            writer.add_scalar(key, value, step)
    if image:
        picture = gap_image(rows, f"step {step}")
        writer.add_image(f"{prefix}gap_vs_sigma", picture, step, dataformats="HWC")
    return values
