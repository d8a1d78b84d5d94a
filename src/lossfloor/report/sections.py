"""One section builder per kind of input: the figure (drawn by the result's own ``plot`` on the
axes of a bare ``matplotlib.figure.Figure``: no pyplot, no backend), the sentences that read it,
computed from its numbers, and where the numbers came from (provenance).

Units throughout: σ is the VE noise level (x = x0 + σ·ε, the data in [−1, 1]); losses are
per element, in x0 units (‖D(x) − x0‖²/D).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lossfloor.plots import draw_optimal_loss, new_figure
from lossfloor.report.inputs import DataGroup, Input, describe_data, json_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lossfloor.diagnosis import Diagnosis
    from lossfloor.floor import Floor
    from lossfloor.optimal import Curve
    from lossfloor.scaling import ScalingFit
    from lossfloor.schedules.optimal import ScheduleTable
    from lossfloor.training.stats import StatsRecord

#: σ* is the smallest σ with J*(σ) ≥ STAR_THRESHOLD·Var: the optimal-loss schedule's rule
#: (``OptimalLossSchedule.star_threshold``'s default; tests/test_report.py checks the two agree).
STAR_THRESHOLD = 0.01

#: The sentence on units every figure's section ends its reading with.
UNITS = "σ: VE noise level (x = x0 + σ·ε, data in [−1, 1]); losses per element, in x0 units."


@dataclass
class Section:
    """A part of the page: a title, a figure (or none), the sentences that read it and the
    provenance (label → text)."""

    key: str
    title: str
    figure: Figure | None
    sentences: list[str]
    provenance: dict[str, str] = field(default_factory=dict)
    alt: str = ""
    #: A table shown under the figure: (header, rows of text).
    table: tuple[list[str], list[list[str]]] | None = None
    #: The one sentence the page's summary takes from the section.
    summary: str = ""


def g(x: float | None, digits: int = 3) -> str:
    """A number in ``digits`` significant figures ("n/a" for None, "≈ 0" below 1e-30)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) < 1e-30:
        return "≈ 0"
    return f"{x:.{digits}g}"


def pct(x: float) -> str:
    """A fraction as a percentage: two significant figures, whole percents from 100%."""
    return f"{100 * x:.0f}%" if x >= 1 else f"{100 * x:.2g}%"


def sigma_list(sigmas: Sequence[float]) -> str:
    """σ values in words: "σ = a", "σ = a, b and c", or "σ = a to b (k levels)" for more than
    four."""
    vals = [g(s) for s in sorted(sigmas)]
    if len(vals) > 4:
        return f"σ = {vals[0]} to {vals[-1]} ({len(vals)} levels)"
    return "σ = " + (vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " and " + vals[-1])


def sigma_star(sigmas: np.ndarray, values: np.ndarray, variance: float) -> float | None:
    """σ* = the smallest σ where J* reaches STAR_THRESHOLD·Var, interpolated linearly in
    (ln σ, ln J*) between the grid points around the crossing (the schedule's rule); None where
    J* never reaches it."""
    level = STAR_THRESHOLD * variance
    above = np.nonzero(values >= level)[0]
    if above.size == 0:
        return None
    k = int(above[0])
    if k == 0:
        return float(sigmas[0])
    u0, u1 = np.log(sigmas[k - 1 : k + 1])
    j0, j1 = values[k - 1 : k + 1]
    if j0 > 0:
        j0, j1, level = np.log(j0), np.log(j1), np.log(level)
    return float(np.exp(u0 + (level - j0) / (j1 - j0) * (u1 - u0)))


def _figure(
    rows: int, cols: int, size: tuple[float, float], **kw: Any
) -> tuple[Figure, list[Axes]]:
    return new_figure(rows, cols, size, pyplot=False, **kw)


def _time(seconds: float) -> str:
    """Seconds in words (s, min or h)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _common_provenance(item: Input) -> dict[str, str]:
    result = item.result
    out = {"file": item.path, "kind": item.kind}
    version = getattr(result, "lossfloor_version", None)
    out["written by"] = f"lossfloor {version}" if version else "lossfloor (version not recorded)"
    if item.dataset is not None:
        out["data"] = describe_data(item.dataset)
        if item.dataset.get("sha256"):
            out["data fingerprint (sha256)"] = str(item.dataset["sha256"])
    return out


#: What no result file records yet (said on the page, not guessed).
NOT_RECORDED = "not recorded in the file"


def _run_provenance(item: Input, seconds: float | None) -> dict[str, str]:
    """The run's rows: the compute time (``seconds``, the result's own per-σ times), and from
    the file's ``provenance`` block (``lossfloor.provenance.describe_run``, written by the CLI)
    the software, the machine, the command and the wall-clock time, else "not recorded"."""
    run = getattr(item.result, "provenance", None)
    out = {"compute time": NOT_RECORDED if not seconds else _time(seconds)}
    if not isinstance(run, dict):
        out["torch version, CPU/GPU, command"] = NOT_RECORDED
        return out
    out["software"] = ", ".join(
        f"{name} {run[key]}"
        for key, name in (("lossfloor", "lossfloor"), ("torch", "torch"), ("python", "Python"))
        if key in run
    )
    machine = [str(run[key]) for key in ("cpu", "gpu") if run.get(key)]
    if "threads" in run:
        machine.append(f"{run['threads']} torch threads")
    out["CPU/GPU"] = ", ".join(machine) or NOT_RECORDED
    out["command"] = str(run.get("command", NOT_RECORDED))
    if "started" in run:
        wall = f" ({_time(run['seconds'])})" if isinstance(run.get("seconds"), int | float) else ""
        out["run"] = f"{run['started']} to {run.get('finished', '?')}{wall}"
    return out


# --- estimate: J*(σ) ---------------------------------------------------------------------------


def curve_star(curve: Curve) -> tuple[float | None, float]:
    """σ* of a curve and the variance it is relative to (the data's, else J* at the largest σ)."""
    v = curve.values
    variance = curve.data_variance if curve.data_variance is not None else float(v[-1])
    return sigma_star(curve.sigmas, v, variance), variance


def curve_section(item: Input) -> Section:
    """J*(σ) ± 2 s.e., σ* marked; what memorises, what is unresolved, the total."""
    curve: Curve = item.result
    fig, (ax,) = _figure(1, 1, (7.5, 4.4))
    curve.plot(ax)
    s = curve.sigmas
    star, variance = curve_star(curve)
    if star is not None:
        ax.axvline(star, color="gray", ls=":", lw=1.2, label=f"σ* = {g(star)}")
        ax.legend(fontsize=8)
    ax.set_title("J*(σ): the lowest loss any denoiser reaches on this training set")
    name = (curve.estimator or {}).get("name", "an")
    text = [
        f"J*(σ) is the lowest loss any denoiser can reach at noise level σ on this training set, "
        f"estimated at {len(s)} levels from σ = {g(s[0])} to {g(s[-1])} with the {name} "
        f"estimator{f' ({curve.outer:,} draws)' if curve.outer else ''}; the band is ±2 s.e., "
        "▽ marks J* too small for the log axis (≈ 0, not missing)."
    ]
    if star is not None:
        text.append(
            f"σ* ≈ {g(star)} (dotted): below it J* < {pct(STAR_THRESHOLD)} of the data variance "
            f"({g(variance)}), because the optimal denoiser of a finite training set recalls its "
            "training images there; a model whose loss approaches J* below σ* is copying its "
            f"data. Above σ*, J* rises towards the data variance (dashed) as σ grows."
        )
        summary = (
            f"σ* ≈ {g(star)}: below it J* ≈ 0 (the optimal denoiser memorises the training "
            f"set); above it J* rises to the data variance {g(variance)}."
        )
    else:
        summary = f"J* stays below {pct(STAR_THRESHOLD)} of the data variance at every σ."
    text.append(_resolution(curve, star))
    if curve.total is not None:
        t = curve.total
        sched = ", ".join(f"{k} {v}" for k, v in t.schedule.items() if k != "name")
        text.append(
            f"Weighted as the {t.schedule.get('name', '')} training loss ({sched}), the lowest "
            f"reachable total is {g(t.optimal_loss)} ± {g(t.stderr, 2)} (quadrature error "
            f"{g(t.quadrature_error, 2)}): a training run with that weighting cannot go below it."
        )
    text.append(UNITS)
    prov = _common_provenance(item)
    prov["estimator"] = json_text(curve.estimator) if curve.estimator else NOT_RECORDED
    for key in ("outer", "seed", "draws", "form", "precision", "target_rse"):
        value = getattr(curve, key, None)
        if value is not None:
            prov[key] = str(value)
    if curve.process:
        prov["process, target"] = f"{json_text(curve.process)}, {json_text(curve.target)}"
    prov.update(_run_provenance(item, sum(p.seconds or 0.0 for p in curve.points)))
    alt = "J* against σ on log axes with its ±2 s.e. band and σ* marked"
    return Section("estimate", "Optimal loss J*(σ)", fig, text, prov, alt, summary=summary)


def _resolution(curve: Curve, star: float | None) -> str:
    """The sentence on unresolved points, or on the relative errors above σ*."""
    pts = sorted(curve.points, key=lambda p: p.sigma)
    bad = [p.sigma for p in pts if p.resolved is False]
    if bad:
        return (
            f"{len(bad)} of {len(pts)} points are unresolved (too few effective draws: "
            f"{sigma_list(bad)}); they are drawn hollow and are not measurements of J*, "
            "not zeros (memorised ones are shown as an upper bound ▼)."
        )
    shown = [p for p in pts if star is None or p.sigma >= star]
    rel = max((p.stderr / p.optimal_loss for p in shown if p.optimal_loss > 0), default=0.0)
    return f"Every point is resolved; above σ* the standard error is at most {pct(rel)} of J*."


# --- diagnosis: a model against J* --------------------------------------------------------------


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
    fig, axes = _figure(2, 1, (7.5, 6.2), sharex=True, height_ratios=[3, 2])
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
    prov = _common_provenance(item)
    prov["model"] = json_text(d.model) if d.model else NOT_RECORDED
    prov["draws"] = f"outer {d.outer:,}, seed {d.seed}, {d.draws}"
    if d.optimal_from:
        prov["J* from"] = d.optimal_from
    if d.heldout:
        prov["held-out data"] = describe_data(d.heldout)
    prov.update(_run_provenance(item, sum(p.seconds for p in d.points)))
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
    fig, (ax,) = _figure(1, 1, (7.5, 4.6))
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


# --- floor: the generalising bracket ------------------------------------------------------------


def floor_section(item: Input) -> Section:
    """The bracket [J*_train, least held-out bound] and the N-trend; the verdict per σ."""
    f: Floor = item.result
    fig, axes = _figure(2, 1, (7.5, 9.0))
    f.plot(axes)
    fig.tight_layout()
    pts = sorted(f.points, key=lambda p: p.sigma)
    held = describe_data(f.heldout)
    text = [
        "The generalising floor: J* of the training set (lower edge) is reached only by "
        "memorising; the least loss of a fixed denoiser on held-out data "
        f"({held}) is the upper edge. A model that generalises lands in between."
    ]
    by: dict[str, list[float]] = {}
    for p in pts:
        by.setdefault(p.verdict, []).append(p.sigma)
    says = {
        "memorised": "J*_train ≈ 0: a model's loss below the upper edge there is memorisation, "
        "not progress",
        "rising": "J* still grows with N: the training set is too small to pin the population "
        "optimum",
        "converged": "J* no longer changes with N: J*_train is the population's, a gap above it "
        "is underfitting",
        "undecided": "more repeats or draws decide",
    }
    text += [f"{verdict.capitalize()} at {sigma_list(s)}: {says.get(verdict, '')}."
             for verdict, s in by.items()]  # fmt: skip
    widest = max(pts, key=lambda p: p.upper - p.lower)
    text.append(
        f"The bracket is widest at σ ≈ {g(widest.sigma)} ({g(widest.lower)} to "
        f"{g(widest.upper)}): that is where the floor's uncertainty about the reachable loss "
        "is largest. Lower panel: J* of nested subsets of size n relative to the full N (a "
        "line still rising at the full N: more data would raise J*)."
    )
    text.append(UNITS)
    prov = _common_provenance(item)
    prov["held-out data"] = held
    prov["options"] = json_text(f.params)
    prov.update(_run_provenance(item, None))
    alt = "upper: the floor's bracket against σ; lower: J* of subsets against their size"
    summary = "Floor: " + "; ".join(f"{v} at {sigma_list(s)}" for v, s in by.items()) + "."
    return Section("floor", "Generalising floor", fig, text, prov, alt, summary=summary)


# --- schedule ---------------------------------------------------------------------------------


def schedule_section(item: Input) -> Section:
    """w(σ), J*(σ) and the density of ln σ; σ*, the mode, the share below σ*, the fit."""
    t: ScheduleTable = item.result
    fig, (ax,) = _figure(1, 1, (7.5, 4.4))
    t.plot(ax)
    s, p = np.asarray(t.sigma), np.asarray(t.log_sigma_density)
    resolved = t.params.get("resolved", {})
    star, w_max = resolved.get("sigma_star"), resolved.get("w_max")
    u = np.log(s)
    mass = np.concatenate([[0.0], np.cumsum(np.diff(u) * (p[1:] + p[:-1]) / 2)])
    below = float(np.interp(np.log(star), u, mass) / mass[-1]) if star else None
    text = [
        "The training schedule this J* implies: each σ weighted by w(σ) = a·min(1/J*(σ), "
        f"w_max) (w_max = {g(w_max)}), so that the loss reads as J_θ/J*, and noise levels "
        f"drawn with the density of ln σ shown (right axis; {t.params.get('density')} rule"
        + (", from the model's gap" if t.gap is not None else "")
        + f"), over σ = {g(float(s[0]))} to {g(float(s[-1]))}."
    ]
    text.append(
        f"Schedule: σ* = {g(star)}; the density peaks at σ ≈ {g(float(s[int(np.argmax(p))]))}"
        + (
            f" and puts {pct(below)} of the draws below σ*, where J* ≈ 0."
            if below is not None
            else "."
        )  # fmt: skip
    )
    if t.fit is not None:
        fit = t.fit
        text.append(
            f"The closest lognormal has P_mean = {fit['P_mean']:.3f}, P_std = {fit['P_std']:.3f} "
            f"(KL {g(fit['kl'], 2)} nats): EDM's σ sampling with these values is the nearest "
            "standard setting (SD3's logit-normal m, s are the same numbers)."
        )
    text.append(UNITS + " w in 1/(x0 units).")
    prov = _common_provenance(item)
    prov["options"] = json_text(
        {k: v for k, v in t.params.items() if k not in ("resolved", "dataset")}
    )
    prov["resolved"] = json_text(resolved)
    prov.update(_run_provenance(item, None))
    alt = "the schedule's weight, J* and the density of ln σ against σ"
    summary = text[1]
    if t.fit is not None:
        summary += (
            f" Closest lognormal: P_mean = {t.fit['P_mean']:.3f}, P_std = {t.fit['P_std']:.3f}."
        )
    return Section("schedule", "Training schedule", fig, text, prov, alt, summary=summary)


# --- scaling fits -------------------------------------------------------------------------------


def scaling_section(item: Input, index: int) -> Section:
    """One panel per σ (and the total): the runs' losses against F, the raw and subtracted
    power laws; where subtracting J* changes the exponent most."""
    fit: ScalingFit = item.result
    figure = None
    if all(f.x for f in fit.fits):  # a fit read from its JSON has no rows to draw
        from lossfloor.plots import scaling_layout

        layout = scaling_layout(len(fit.fits))
        figure, axes = _figure(layout["rows"], layout["cols"], layout["figsize"])
        fit.plot(axes)
        figure.tight_layout()
    where = [f for f in fit.fits if f.sigma is not None]
    text = [
        f"Per σ (and for the total loss), the runs' loss J is fitted against {fit.x} F as a "
        "power law: raw, J = β·F^α, and with J* subtracted, J − J* = β·F^α: only the part "
        "above J* can shrink with scale."
    ]
    if where:
        big = max(where, key=lambda f: abs(f.subtracted.alpha - f.raw.alpha))
        text.append(
            f"Subtracting J* changes the exponent most at σ = {g(big.sigma)}: α = "
            f"{g(big.raw.alpha)} raw, {g(big.subtracted.alpha)} above J* (J* = "
            f"{g(big.optimal_loss)}); where J* ≈ 0 the two fits agree."
        )
    total = next((f for f in fit.fits if f.sigma is None), None)
    if total is not None:
        text.append(
            f"Total loss: α = {g(total.raw.alpha)} raw, {g(total.subtracted.alpha)} above J*."
        )
    if figure is None:
        text.append("The file holds the fits, not the runs' losses, so there is no figure.")
    text.append("ρ: the correlation of the log–log fit (−1: a perfect power law).")
    text.append("Losses per element, in x0 units.")
    prov = _common_provenance(item)
    prov["x"] = fit.x
    prov["runs per fit"] = ", ".join(sorted({str(f.n) for f in fit.fits}))
    prov.update(_run_provenance(item, None))
    header = ["σ", "J*", "raw α (ρ)", "α above J* (ρ)"]
    rows = [
        [
            "total" if f.sigma is None else g(f.sigma),
            g(f.optimal_loss),
            f"{g(f.raw.alpha)} ({f.raw.rho:.2f})",
            f"{g(f.subtracted.alpha)} ({f.subtracted.rho:.2f})",
        ]
        for f in fit.fits
    ]
    alt = "loss against compute per σ with power-law fits"
    title = f"Scaling fit {index} (against {fit.x})"
    summary = ""
    if total is not None:
        summary = (
            f"Scaling against F = {fit.x}: total loss ∝ F^{g(total.raw.alpha)} raw, the part above "
            f"J* ∝ F^{g(total.subtracted.alpha)}."
        )
    return Section(f"scaling-{index}", title, figure, text, prov, alt, (header, rows), summary)


# --- training stats -------------------------------------------------------------------------


def training_section(item: Input, index: int) -> Section:
    """The x0 loss against the step, overall and per σ bin; the last values."""
    from lossfloor.training.stats import SIGMA_BIN_EDGES

    records: list[StatsRecord] = item.result
    fig, axes = _figure(2, 1, (7.5, 8.0))
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
        f"{_time(last.seconds)} of training); the x0 loss went from {g(records[0].loss_x0)} to "
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
    prov.update(_run_provenance(item, last.seconds))
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


def group_sections(group: DataGroup) -> list[Section]:
    """The sections of one dataset's inputs: the overview (J* and models), then each input's."""
    star = group_star(group)
    builders: dict[str, Callable[[Input, int], Section]] = {
        "estimate": lambda i, k: curve_section(i),
        "diagnosis": lambda i, k: diagnosis_section(i, star, k),
        "floor": lambda i, k: floor_section(i),
        "schedule": lambda i, k: schedule_section(i),
        "scaling-fit": scaling_section,
        "training": training_section,
    }
    out: list[Section] = []
    overview = overview_section(group, star)
    if overview is not None:
        out.append(overview)
    counts: dict[str, int] = {}
    for item in group.inputs:
        counts[item.kind] = counts.get(item.kind, 0) + 1
        section = builders[item.kind](item, counts[item.kind])
        if len(group.of(item.kind)) > 1 and item.kind in ("estimate", "floor", "schedule"):
            section.key += f"-{counts[item.kind]}"
            section.title += f" ({counts[item.kind]})"
        out.append(section)
    return out


def group_star(group: DataGroup) -> float | None:
    """The data's σ*: from its first estimate, else from J*_train of its floor (relative to the
    data variance), else from a diagnosis' J* (relative to its largest J*)."""
    if group.of("estimate"):
        return curve_star(group.of("estimate")[0].result)[0]
    if group.of("floor"):
        f: Floor = group.of("floor")[0].result
        lows = np.array(sorted((p.sigma, p.lower) for p in f.points))
        return sigma_star(lows[:, 0], lows[:, 1], f.data_variance)
    if group.of("diagnosis"):
        d: Diagnosis = group.of("diagnosis")[0].result
        optimal = np.array(sorted((p.sigma, p.optimal_loss) for p in d.points))
        return sigma_star(optimal[:, 0], optimal[:, 1], d.optimal_top)
    return None
