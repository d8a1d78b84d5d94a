"""What `lossfloor estimate` reports: the table, the held-out losses, the warnings on stderr,
and the files the options ask for."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lossfloor.data import Dataset
    from lossfloor.data.chunked import ChunkedDataset
    from lossfloor.optimal import Curve


def report(curve: Curve, args: argparse.Namespace, ds: Dataset | ChunkedDataset) -> None:
    """The table (unless --quiet), the JSON and the plot the options ask for (in that order:
    a failing plot leaves the JSON written)."""
    from lossfloor.cli.common import save_result, write_plot

    if not args.quiet:
        _print_table(curve, args)
        if curve.sources is not None:
            _print_heldout(curve, curve.sources)
    _warn_unresolved(curve)
    _warn_target_missed(curve)
    if args.out:
        save_result(curve, args.out, args)
    if args.csv:
        curve.to_csv(args.csv)
    if args.plot:
        from lossfloor.plots import plot_optimal_loss

        assert curve.estimator is not None  # estimate_curve describes its estimator
        name = curve.estimator["name"]
        write_plot(
            args.plot,
            lambda: plot_optimal_loss(
                args.plot,
                [(name, curve)],
                data_variance=curve.data_variance,
                title=f"{ds.name}: optimal loss (n={ds.n}, M={curve.outer})",
            ),
            args.out or args.csv,
        )


def _print_heldout(curve: Curve, sources: dict[str, Any]) -> None:
    """Held-out losses (upper bounds on the population's J*) beside J* of the training set
    (``sources``: the curve's description of the held-out set)."""
    print(f"held-out sources {sources['name']} (n={sources['n']}), per element:")
    print(f"{'sigma':>10} {'J*(train)':>12} {'held-out':>12} {'stderr':>10} {'smoothed':>12} "
          f"{'stderr':>10} {'b':>8}")  # fmt: skip
    for p in curve.points:
        sm = (
            "" if p.smoothed_loss is None else f"{p.smoothed_loss:12.6g} {p.smoothed_stderr:10.3g} "
        )
        b = "" if p.bandwidth is None else f"{p.bandwidth:8.3g}"
        print(f"{p.sigma:10.4g} {p.optimal_loss:12.6g} {p.heldout_loss:12.6g} "
              f"{p.heldout_stderr:10.3g} {sm}{b}")  # fmt: skip


def _warn_unresolved(curve: Curve) -> None:
    """One line on stderr naming the σ whose value rests on too few draws to trust its stderr,
    but for those where the bound shows J* memorised (the table reports the bound there)."""
    from lossfloor.optimal.moments import MIN_EFFECTIVE_DRAWS

    bad = [p for p in curve.points if p.resolved is False and not p.memorised]
    gaussian = bool((curve.dataset or {}).get("gaussian_items"))  # plain draws only
    if bad:
        listed = ", ".join(f"{p.sigma:.4g} (ESS {p.ess:.3g})" for p in bad)
        print(
            f"lossfloor: warning: J* is not resolved at σ = {listed}: fewer than "
            f"{MIN_EFFECTIVE_DRAWS:g} effective draws carry it, so its value and standard error "
            "are unreliable; "
            + ("use more --outer" if curve.draws == "tilted" or gaussian else "use --draws tilted"),
            file=sys.stderr,
        )


def _warn_target_missed(curve: Curve) -> None:
    """One line on stderr naming the σ whose relative standard error exceeds --target-rse
    (their draws reached --max-outer)."""
    if curve.target_rse is None:
        return
    bad = [p for p in curve.points if p.rse is None or p.rse > curve.target_rse]
    if bad:
        listed = ", ".join(
            f"{p.sigma:.4g} ({'J* = 0' if p.rse is None else f'rse {p.rse:.3g}'})" for p in bad
        )
        print(
            f"lossfloor: warning: the target relative standard error {curve.target_rse:g} is "
            f"not reached at σ = {listed} with {curve.outer} draws; raise --max-outer",
            file=sys.stderr,
        )


def _print_table(curve: Curve, args: argparse.Namespace) -> None:
    """The points, a line saying what each column is, the data variance and the total; with
    adaptive sizes, each σ's draws M (and far sample L) and achieved relative stderr; where J*
    is memorised and the draws do not resolve it, its upper bound "≤ b" in place of the
    estimate."""
    from lossfloor.diffusion import get_process, get_target
    from lossfloor.optimal.bound import MEMORISED_SHARE
    from lossfloor.optimal.moments import in_target_units

    process = get_process(args.process)
    target = get_target(args.target, sigma_data=args.sigma_data)
    head = f"J*({args.target})"
    adaptive = curve.target_rse is not None
    far = adaptive and any(p.inner is not None for p in curve.points)
    extra = (f" {'M':>8}" + (f" {'L':>7}" if far else "") + f" {'rse':>8}") if adaptive else ""
    print(f"{'sigma':>10} {'t':>10} {'J*(x0)':>12} {'stderr':>10} {head:>12} {'s':>7}{extra}")
    for p in curve.points:
        value, se, tgt = f"{p.optimal_loss:12.6g}", f"{p.stderr:10.3g}", p.optimal_loss_target
        bound = p.upper_bound if p.memorised and not p.resolved else None  # set with memorised
        bounded = bound is not None
        if bound is not None:
            value, se = f"≤ {bound:.4g}".rjust(12), f"{'memorised':>10}"
            tgt = in_target_units(bound, p.sigma, process, target)
        sizes = ""
        if adaptive:
            rse = "—" if p.rse is None else f"{p.rse:.3g}"
            sizes = f" {p.outer:8d}" + (f" {p.inner:7d}" if far else "") + f" {rse:>8}"
        shown = "—" if tgt is None else f"{'≤ ' if bounded else ''}{tgt:.6g}"
        print(f"{p.sigma:10.4g} {p.t:10.4g} {value} {se} {shown:>12} {p.seconds:7.2f}{sizes}")
    print(
        f"sigma: VE σ; t: the process' time at σ; J*(x0) ± stderr: per element, x0 units; "
        f"{head}: per element, in the target's units; s: seconds for that σ"
        + (
            f"; M: outer draws used (target rse {curve.target_rse:g}, pilot {curve.pilot})"
            + ("; L: far sample" if far else "")
            + "; rse: stderr/J*"
            if adaptive
            else ""
        )
        + (
            f"; ≤ b, memorised: J* ≤ b, a rigorous bound (the nearest-point denoiser's error) "
            f"at most {MEMORISED_SHARE:g} × the data variance, where the draws cannot resolve J*"
            if any(p.memorised and not p.resolved for p in curve.points)
            else ""
        )
    )
    print(f"data variance per element: {curve.data_variance:.6g} (J* as σ → ∞)")
    if curve.total is not None:
        t = curve.total
        print(
            f"total under {t.schedule['name']}: {t.optimal_loss:.6g} ± {t.stderr:.2g} "
            f"(quadrature ±{t.quadrature_error:.2g}, tail {t.tail:.2g})"
        )
