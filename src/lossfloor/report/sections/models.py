"""The models' sections: J* and every model's loss on one axes (the overview), and each
diagnosis: the gap to J*, where it peaks and, with a floor's readings, what kind of gap it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lossfloor.plots import draw_optimal_loss
from lossfloor.report.inputs import DataGroup, Input, describe_data, json_text
from lossfloor.report.sections.common import (
    NOT_RECORDED,
    UNITS,
    Section,
    bare_figure,
    common_provenance,
    g,
    pct,
    run_provenance,
    sigma_list,
)

if TYPE_CHECKING:
    from lossfloor.diagnosis import Diagnosis


def model_name(d: Diagnosis, index: int) -> str:
    """A model's short name: the last part of its path (a run directory, a checkpoint)."""
    path = (d.model or {}).get("path")
    if not path:
        return f"model {index}"
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def diagnosis_section(item: Input, star: float | None, index: int) -> Section:
    """J_θ and J* against σ, the gap ± 2 s.e., σ* (the data's) marked; where the model is at J*,
    where the gap peaks, and, with a floor's readings, what kind of gap it is."""
    d: Diagnosis = item.result
    fig, axes = bare_figure(2, 1, (7.5, 6.2), sharex=True, height_ratios=[3, 2])
    d.plot(axes)
    pts = sorted(d.points, key=lambda p: p.sigma)
    if star is not None:
        for ax in axes:
            ax.axvline(star, color="gray", ls=":", lw=1.2)
        axes[0].text(star, 0.97, f" σ* ≈ {g(star)}", transform=axes[0].get_xaxis_transform(),
                     fontsize=8, color="gray", va="top")  # fmt: skip
    name = model_name(d, index)
    axes[0].set_title(f"model {index} ({name}) against J*")
    text = [
        f"Model {index} ({name}) and the optimal denoiser are scored on the same {d.outer:,} "
        f"draws at {len(pts)} noise levels; the gap J_θ − J* (lower panel, ±2 s.e.) is what the "
        "model could still learn."
    ]
    within = [p.sigma for p in pts if p.gap <= 2 * p.gap_stderr]
    if within:
        text.append(
            f"The model is within 2 s.e. of J* at {sigma_list(within)}: nothing is left to "
            "learn there without memorising."
        )
    else:
        text.append("The model is more than 2 s.e. above J* at every σ measured.")
    peak = _peak(d)
    text.append(peak)
    readings = [p.reading for p in pts if p.reading]
    if readings:
        text += _readings(pts)
    elif star is not None:
        low = [p for p in pts if p.sigma < star]
        if low:
            text.append(
                f"Below σ* ≈ {g(star)} J* ≈ 0 because the optimum memorises: the gap there (up "
                f"to {g(max(p.gap for p in low))}) is partly the price of generalising, not "
                "only underfitting; lossfloor floor and lossfloor diagnose --floor tell them apart."
            )
    text.append(UNITS)
    prov = common_provenance(item)
    prov["model"] = json_text(d.model) if d.model else NOT_RECORDED
    prov["draws"] = f"outer {d.outer:,}, seed {d.seed}, {d.draws}"
    if d.optimal_from:
        prov["J* from"] = d.optimal_from
    if d.heldout:
        prov["held-out data"] = describe_data(d.heldout)
    prov.update(run_provenance(item, sum(p.seconds for p in d.points)))
    alt = "model loss and J* against σ, and the gap with ±2 s.e. error bars"
    summary = f"Model {index} ({name}): " + peak[0].lower() + peak[1:]
    return Section(f"diagnosis-{index}", f"Model {index}: distance to J*", fig, text, prov, alt,
                   summary=summary)  # fmt: skip


def _peak(d: Diagnosis) -> str:
    """Where the gap peaks, and its share of J* there."""
    peak = d.largest_gap
    rels = dict(zip([p.sigma for p in d.points], d.relative_gaps(), strict=True))
    rel = rels[peak.sigma]
    share = f"{pct(rel)} of J*" if rel is not None else "J* ≈ 0 there: all of it is the model's"
    text = (
        f"The gap peaks at σ ≈ {g(peak.sigma)} ({g(peak.gap)} ± {g(peak.gap_stderr, 2)}, {share})"
    )
    return text + ": that is where capacity or training time helps most."


#: What each of the floor's readings of a gap means and what to do (``floor.READINGS``).
READING_SAYS = {
    "underfitting": "J* is converged in N and the gap exceeds 2 s.e., so the gap is headroom a "
    "model can reach: more capacity or training time",
    "provable headroom": "the model's held-out loss is above the least held-out bound: a fixed "
    "denoiser generalises better there, so there is headroom",
    "within the bracket": "the model's held-out loss is inside the floor's bracket: the gap may "
    "be the price of generalising, not headroom; do not chase it",
}


def _readings(pts: Sequence[Any]) -> list[str]:
    """The floor's reading of the gap: one sentence per reading, with its σ."""
    by: dict[str, list[float]] = {}
    for p in pts:
        if p.reading:
            by.setdefault(p.reading, []).append(p.sigma)
    return ["The generalising floor reads this gap as follows."] + [
        f"{reading.capitalize()} at {sigma_list(s)}: {READING_SAYS.get(reading, '')}."
        for reading, s in by.items()
    ]


def overview_section(group: DataGroup, star: float | None) -> Section | None:
    """J* of every estimate and each model's loss on one axes, σ* marked (None without both
    an estimate and a model)."""
    curves, diagnoses = group.of("estimate"), group.of("diagnosis")
    if not diagnoses or not curves:
        return None
    fig, (ax,) = bare_figure(1, 1, (7.5, 4.6))
    labelled = [(f"J* ({(i.result.estimator or {}).get('name', 'estimate')})", i.result)
                for i in curves]  # fmt: skip
    draw_optimal_loss(labelled, ax, data_variance=curves[0].result.data_variance)
    top = ax.get_ylim()[1]
    for k, item in enumerate(diagnoses, start=1):
        pts = sorted(item.result.points, key=lambda p: p.sigma)
        losses = [p.model_loss for p in pts]
        top = max(top, 1.5 * max(losses))
        ax.plot([p.sigma for p in pts], losses, "o-", ms=4, color=f"C{k + len(curves)}",
                label=f"model {k} ({model_name(item.result, k)}): J_θ(σ)")  # fmt: skip
    ax.set_ylim(top=top)
    if star is not None:
        ax.axvline(star, color="gray", ls=":", lw=1.2, label=f"σ* ≈ {g(star)}")
    ax.set_ylabel("loss per element (x0 units)")
    ax.legend(fontsize=8)
    ax.set_title("J* and the models' losses")
    text = [
        "Every model's loss J_θ(σ) against the dataset's J*(σ) on one axes (models numbered as "
        "their sections below): the vertical distance is what is left to learn; where the "
        "lines meet, the model has reached the optimum of this training set.",
        UNITS,
    ]
    alt = "J* and each model's loss against σ on log axes"
    return Section("overview", "J* and the models", fig, text, {}, alt)
