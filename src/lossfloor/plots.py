"""PNG plots of curves (matplotlib, Agg backend), written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lossfloor.io import save_with  # noqa: E402

if TYPE_CHECKING:
    from lossfloor.diagnosis import Diagnosis
    from lossfloor.optimal import Curve
    from lossfloor.scaling import ScalingFit


def save_figure(fig, path: str | os.PathLike[str]) -> None:
    save_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_optimal_loss(
    path: str | os.PathLike[str],
    curves: Sequence[tuple[str, Curve]],
    *,
    data_variance: float | None = None,
    title: str = "",
) -> None:
    """J*(σ) per element against σ (log–log), one line per (label, curve), ±2 s.e."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    positive = [c.values[c.values > 0] for _, c in curves]
    vmax = max((float(p.max()) for p in positive if p.size), default=1.0)
    floor = max(min((float(p.min()) for p in positive if p.size), default=vmax) / 3, vmax * 1e-8)
    for label, curve in curves:
        s, v, se = curve.sigmas, curve.values, curve.stderrs
        ax.plot(s, np.maximum(v, floor), marker="o", ms=3, label=label)
        lo = np.maximum(v - 2 * se, np.maximum(v / 10, floor))
        ax.fill_between(s, lo, np.maximum(v + 2 * se, floor), alpha=0.25)
    ax.set_ylim(bottom=floor)
    if data_variance is not None:
        ax.axhline(data_variance, color="gray", ls="--", lw=1, label="data variance (σ→∞)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("σ (VE)")
    ax.set_ylabel("optimal loss J*(σ) per element (x0 units)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_diagnosis(path: str | os.PathLike[str], diagnosis: Diagnosis, title: str = "") -> None:
    """J* and J_θ against σ (log axes) above, the gap ± 2 s.e. below."""
    pts = diagnosis.points
    s = np.array([p.sigma for p in pts])
    jm = np.array([p.model_loss for p in pts])
    jo = np.array([p.optimal_loss for p in pts])
    g = np.array([p.gap for p in pts])
    gse = np.array([p.gap_stderr for p in pts])
    fig, (a, b) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True, height_ratios=[3, 2])
    floor = max(min(v for v in np.concatenate([jm, jo]) if v > 0) / 3, jm.max() * 1e-8)
    a.plot(s, np.maximum(jm, floor), "o-", ms=3, label="model J_θ(σ)")
    a.plot(s, np.maximum(jo, floor), "s-", ms=3, label="optimal J*(σ)")
    a.set(xscale="log", yscale="log", ylabel="loss per element (x0 units)", title=title)
    b.errorbar(s, g, yerr=2 * gse, fmt="o-", ms=3, capsize=2, color="C3")
    b.axhline(0, color="gray", lw=0.8)
    b.set(xscale="log", xlabel="σ (VE)", ylabel="gap J_θ − J*")
    b.text(0.01, 0.97, "where J* ≈ 0 the optimum memorises: a gap there is\npartly the price "
           "of generalisation, not only underfitting", transform=b.transAxes, va="top",
           fontsize=7, color="gray")  # fmt: skip
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend()
    save_figure(fig, path)


def plot_scaling(path: str | os.PathLike[str], result: ScalingFit) -> None:
    """One panel per σ (and the total): J against F on log axes, the raw fit β·F^α and the
    subtracted fit J* + β·F^α, J* dashed; rows with J ≤ J* marked ×."""
    n = len(result.fits)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, f in zip(axes.flat, result.fits, strict=False):
        x, j = np.array(f.x), np.array(f.loss)
        grid = np.geomspace(x.min(), x.max(), 100)
        above = j > f.optimal_loss
        ax.plot(x[above], j[above], "o", ms=3, color="k", alpha=0.6, label="runs")
        if (~above).any():
            ax.plot(x[~above], j[~above], "x", ms=5, color="C3", label="J ≤ J*")
        r, s = f.raw, f.subtracted
        ax.plot(grid, r.beta * grid**r.alpha, "-", color="C0",
                label=f"raw α={r.alpha:.3g} ρ={r.rho:.3f}")  # fmt: skip
        ax.plot(grid, f.optimal_loss + s.beta * grid**s.alpha, "-", color="C1",
                label=f"J*+βF^α α={s.alpha:.3g} ρ={s.rho:.3f}")  # fmt: skip
        if f.optimal_loss > 0:
            ax.axhline(f.optimal_loss, color="C1", ls="--", lw=0.8, label="J*")
        ax.set(xscale="log", yscale="log", xlabel=result.x, ylabel="loss per element",
               title="total loss" if f.sigma is None else f"σ = {f.sigma:.3g}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def plot_schedule(path: str | os.PathLike[str], table: dict) -> None:
    """An optimal-loss schedule (``OptimalLossSchedule.tabulated()``): w(σ) and J*(σ) on log
    axes (left), the density of ln σ (right), σ* marked."""
    s = np.asarray(table["sigma"])
    w, j = np.asarray(table["weight"]), np.asarray(table["optimal_loss"])
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.plot(s, w, color="C0", label="weight w(σ)")
    positive = j > 0
    ax.plot(s[positive], j[positive], color="C2", label="optimal loss J*(σ)")
    star = table["params"]["resolved"]["sigma_star"]
    ax.axvline(star, color="gray", ls=":", lw=1, label=f"σ* = {star:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="σ (VE)", ylabel="w(σ), J*(σ) (x0 units)")
    ax.set_ylim(bottom=max(float(j[positive].min()) if positive.any() else 1e-6, w.max() * 1e-8))
    right = ax.twinx()
    right.plot(s, table["log_sigma_density"], color="C1", label="density of ln σ, p")
    right.set_ylabel("density of ln σ")
    right.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    params = table["params"]
    gap = "none" if table["gap"] is None else params.get("gap", "table")
    ax.set_title(f"optimal-loss schedule (density: {params.get('density')}, gap: {gap})")
    save_figure(fig, path)
