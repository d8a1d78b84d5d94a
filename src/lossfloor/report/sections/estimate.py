"""The estimate's section: J*(σ) with its band, σ* marked, what memorises, what is unresolved and
the total."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lossfloor.report.inputs import Input, json_text
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
from lossfloor.schedules.tabulated import STAR_THRESHOLD, sigma_star

if TYPE_CHECKING:
    from lossfloor.optimal import Curve


def curve_star(curve: Curve) -> tuple[float | None, float]:
    """σ* of a curve and the variance it is relative to (the data's, else J* at the largest σ)."""
    v = curve.values
    variance = curve.data_variance if curve.data_variance is not None else float(v[-1])
    return sigma_star(curve.sigmas, v, variance), variance


def curve_section(item: Input) -> Section:
    """J*(σ) ± 2 s.e., σ* marked; what memorises, what is unresolved, the total."""
    curve: Curve = item.result
    fig, (ax,) = bare_figure(1, 1, (7.5, 4.4))
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
    prov = common_provenance(item)
    prov["estimator"] = json_text(curve.estimator) if curve.estimator else NOT_RECORDED
    for key in ("outer", "seed", "draws", "form", "precision", "target_rse"):
        value = getattr(curve, key, None)
        if value is not None:
            prov[key] = str(value)
    if curve.process:
        prov["process, target"] = f"{json_text(curve.process)}, {json_text(curve.target)}"
    prov.update(run_provenance(item, sum(p.seconds or 0.0 for p in curve.points)))
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
