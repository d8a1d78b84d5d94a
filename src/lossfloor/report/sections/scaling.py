"""A scaling fit's section: the runs' losses against F per σ, the raw and subtracted power laws,
and where subtracting J* changes the exponent most."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lossfloor.report.inputs import Input
from lossfloor.report.sections.common import (
    Section,
    bare_figure,
    common_provenance,
    g,
    run_provenance,
)

if TYPE_CHECKING:
    from lossfloor.scaling import ScalingFit


def scaling_section(item: Input, index: int) -> Section:
    """One panel per σ (and the total): the runs' losses against F, the raw and subtracted
    power laws; where subtracting J* changes the exponent most."""
    fit: ScalingFit = item.result
    figure = None
    if all(f.x for f in fit.fits):  # a fit read from its JSON has no rows to draw
        from lossfloor.plots import scaling_layout

        layout = scaling_layout(len(fit.fits))
        figure, axes = bare_figure(layout["rows"], layout["cols"], layout["figsize"])
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
    prov = common_provenance(item)
    prov["x"] = fit.x
    prov["runs per fit"] = ", ".join(sorted({str(f.n) for f in fit.fits}))
    prov.update(run_provenance(item, None))
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
