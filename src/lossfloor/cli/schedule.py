"""``lossfloor schedule``: the optimal-loss training schedule (docs/method.md §5) of a J* curve and
a gap, tabulated to JSON and plotted. Its options are shared with ``lossfloor train``."""

from __future__ import annotations

import argparse
import dataclasses

from lossfloor.cli.common import PARAM_OPTIONS, Declared, add_schedule_options, build_schedule


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="the optimal-loss training schedule w(σ), p(σ) of a J* curve",
        description="Tabulate w(σ) = a·min(1/J*, w_max) + bump and the density of ln σ, "
        "p ∝ (w·gap)^γ (docs/method.md §5), to --out (JSON), --csv and --plot (PNG).",
    )
    add_schedule_options(p)
    p.add_argument("--out", required=True, metavar="SCHEDULE.json", help="result JSON")
    p.add_argument("--csv", default=None, metavar="FILE.csv",
                   help="the grid as CSV (units in the header)")  # fmt: skip
    p.add_argument("--plot", default=None, metavar="SCHEDULE.png", help="w, p and J* against σ")
    p.add_argument(
        "--fit",
        action="store_true",
        help="also the lognormal closest to the density: EDM's P_mean, P_std (SD3's "
        "logit-normal m, s), its KL, shares below σ* and above 10σ* (JSON key fit)",
    )
    p.set_defaults(
        run=run,
        param_options=PARAM_OPTIONS,
        declared=Declared(inputs=("--curve", "--gap"), outputs=("--out", "--csv", "--plot")),
    )


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import check_args, save_result, write_plot
    from lossfloor.plots import plot_schedule

    check_args(args)
    schedule = build_schedule(args, allow_online=False)
    table = schedule.tabulated()
    if args.fit:
        from lossfloor.schedules.fit import fit_lognormal

        table = dataclasses.replace(table, fit=fit_lognormal(schedule).to_json())
    save_result(table, args.out, args)
    if args.csv:
        table.to_csv(args.csv)
    resolved = table.params["resolved"]
    print(f"σ* = {resolved['sigma_star']:.4g}, w_max = {resolved['w_max']:.4g}; "
          f"{len(table.sigma)} grid points written to {args.out}")  # fmt: skip
    if table.fit is not None:
        fit = table.fit
        below, above = fit["share_below_sigma_star"], fit["share_above_10_sigma_star"]
        print(f"lognormal fit: P_mean = {fit['P_mean']:.4f}, P_std = {fit['P_std']:.4f} (SD3 "
              f"logit-normal m, s: the same), KL = {fit['kl']:.4f} nats; share below σ*: "
              f"{below['optimal']:.3f} optimal, {below['lognormal']:.3f} lognormal; above 10σ*: "
              f"{above['optimal']:.3f}, {above['lognormal']:.3f}")  # fmt: skip
    if args.plot:
        write_plot(args.plot, lambda: plot_schedule(args.plot, table.json_fields()), args.out)
    return 0
