"""The schedule's section: w(σ), J*(σ) and the density of ln σ; σ*, the mode, the share below
σ* and the closest lognormal."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lossfloor.report.inputs import Input, json_text
from lossfloor.report.sections.common import (
    UNITS,
    Section,
    bare_figure,
    common_provenance,
    g,
    pct,
    run_provenance,
)

if TYPE_CHECKING:
    from lossfloor.schedules.optimal import ScheduleTable


def schedule_section(item: Input) -> Section:
    """w(σ), J*(σ) and the density of ln σ; σ*, the mode, the share below σ*, the fit."""
    t: ScheduleTable = item.result
    fig, (ax,) = bare_figure(1, 1, (7.5, 4.4))
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
    prov = common_provenance(item)
    prov["options"] = json_text(
        {k: v for k, v in t.params.items() if k not in ("resolved", "dataset")}
    )
    prov["resolved"] = json_text(resolved)
    prov.update(run_provenance(item, None))
    alt = "the schedule's weight, J* and the density of ln σ against σ"
    summary = text[1]
    if t.fit is not None:
        summary += (
            f" Closest lognormal: P_mean = {t.fit['P_mean']:.3f}, P_std = {t.fit['P_std']:.3f}."
        )
    return Section("schedule", "Training schedule", fig, text, prov, alt, summary=summary)
