"""``lossfloor schedule``: the optimal-loss training schedule (docs/method.md §5) of a J* curve and
a gap, tabulated to JSON and plotted. Its options are shared with ``lossfloor train``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from lossfloor.cli.common import Declared
from lossfloor.errors import UserError

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    from lossfloor.schedules import OptimalLossSchedule

# OptimalLossSchedule parameter → (option, type, help); options default to None (= the
# schedule's default), so only the options given reach the schedule.
_PARAMS: dict[str, tuple[str, type, str]] = {
    "a": ("--weight-scale", float, "a in w = a·min(1/J*, w_max) + bump (default 1)"),
    "w_max": ("--w-max", float, "cap of 1/J* (default 1/J*(σ*))"),
    "sigma_star": ("--sigma-star", float, "σ* (default: smallest σ with J* ≥ τ·Var)"),
    "star_threshold": ("--star-threshold", float, "τ of the σ* rule (default 0.01)"),
    "bump": ("--bump", float, "bump height below σ*, relative to a·w_max (default 0: off)"),
    "bump_mean": ("--bump-mean", float, "bump centre μ in ln σ (default ln σ* − 1)"),
    "bump_std": ("--bump-std", float, "bump width s in ln σ (default 0.5)"),
    "density": ("--density", str, "gap: p ∝ (w·gap)^γ; lognormal: EDM's p (default gap)"),
    "p_mean": ("--p-mean", float, "lognormal density: mean of ln σ (default -1.2)"),
    "p_std": ("--p-std", float, "lognormal density: std of ln σ (default 1.2)"),
    "exponent": ("--exponent", float, "γ in p ∝ (w·gap)^γ (default 1)"),
    "gap_floor": ("--gap-floor", float, "gap ≥ this × its maximum (default 0.02)"),
    "halflife": ("--gap-halflife", float, "online gap: half-life in images (default 2000)"),
    "bins": ("--gap-bins", int, "online gap: ln σ bins (default 32)"),
    "sigma_min": ("--sigma-min", float, "lowest σ drawn (default 0.002)"),
    "sigma_max": ("--sigma-max", float, "highest σ drawn (default 80)"),
}
PARAM_OPTIONS = {
    **{param: option for param, (option, _, _) in _PARAMS.items()},
    "optimal_loss": "--curve",
    "gap": "--gap",
}


#: The parameters of the online gap, which exists only while training.
_ONLINE = ("halflife", "bins")


def add_schedule_options(parser: argparse.ArgumentParser, train: bool = False) -> None:
    """--curve, --gap and the schedule's parameters (``--schedule optimal`` of train, where
    --curve is needed only with it; the online gap's options only there)."""
    g = parser.add_argument_group("optimal-loss schedule" + (" (--schedule optimal)" * train))
    g.add_argument("--curve", default=None, required=not train, metavar="CURVE.json",
                   help="J* curve (lossfloor estimate --out) of the training data")  # fmt: skip
    gap_help = "the gap J_θ − J*: a lossfloor diagnose --out file"
    g.add_argument("--gap", default=None, metavar="DIAGNOSIS.json" + "|online" * train,
                   help=gap_help + (", or online (estimated during training)" if train else "")
                   + " (without it: p from w alone)")  # fmt: skip
    for param, (option, kind, text) in _PARAMS.items():
        if param in _ONLINE and not train:
            continue
        metavar = "{gap,lognormal}" if param == "density" else kind.__name__.upper()
        g.add_argument(option, dest=f"sched_{param}", type=kind, default=None, help=text,
                       metavar=metavar)  # fmt: skip


def build_schedule(args: argparse.Namespace, allow_online: bool) -> OptimalLossSchedule:
    """The schedule of --curve, --gap and the parameters given."""
    from lossfloor.diagnosis import Diagnosis
    from lossfloor.optimal import Curve
    from lossfloor.schedules import OptimalLossSchedule
    from lossfloor.schedules.optimal import gap_range

    if args.curve is None:
        raise UserError("the optimal-loss schedule needs --curve CURVE.json (lossfloor estimate)")
    curve = Curve.load(args.curve)
    gap: Any = None
    if args.gap == "online":
        if not allow_online:
            raise UserError("--gap online exists only while training (lossfloor train)")
        gap = "online"
    elif args.gap is not None:
        gap = Diagnosis.load(args.gap)
    params = {p: getattr(args, f"sched_{p}", None) for p in _PARAMS}
    note = None
    if isinstance(gap, Diagnosis):  # the ends not given: inside the gap's σ, with a note
        given = (params["sigma_min"], params["sigma_max"])
        covered = [p.sigma for p in gap.points]
        ends = gap_range(covered, *given)
        default = (OptimalLossSchedule.sigma_min, OptimalLossSchedule.sigma_max)
        wanted = tuple(d if g is None else g for g, d in zip(given, default, strict=True))
        if ends != wanted:
            note = (
                f"lossfloor: note: the gap {args.gap} covers σ in [{min(covered):.4g}, "
                f"{max(covered):.4g}]: the schedule draws σ in [{ends[0]:.4g}, {ends[1]:.4g}], "
                f"not [{wanted[0]:g}, {wanted[1]:g}] (diagnose over that range, or give "
                "--sigma-min/--sigma-max)"
            )
        params["sigma_min"], params["sigma_max"] = ends
    schedule = OptimalLossSchedule.from_curve(
        curve, gap, **{k: v for k, v in params.items() if v is not None}
    )
    if note is not None:
        print(note, file=sys.stderr)
    if (coarse := schedule.coarse_warning()) is not None:
        print(f"lossfloor: warning: --curve {args.curve}: {coarse}", file=sys.stderr)
    return schedule


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="the optimal-loss training schedule w(σ), p(σ) of a J* curve",
        description="Tabulate w(σ) = a·min(1/J*, w_max) + bump and the density of ln σ, "
        "p ∝ (w·gap)^γ (docs/method.md §5), to --out (JSON) and --plot (PNG).",
    )
    add_schedule_options(p)
    p.add_argument("--out", required=True, metavar="SCHEDULE.json", help="result JSON")
    p.add_argument("--plot", default=None, metavar="SCHEDULE.png", help="w, p and J* against σ")
    p.set_defaults(
        run=run,
        param_options=PARAM_OPTIONS,
        declared=Declared(inputs=("--curve", "--gap"), outputs=("--out", "--plot")),
    )


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import check_args, write_plot
    from lossfloor.io import write_json
    from lossfloor.plots import plot_schedule

    check_args(args)
    schedule = build_schedule(args, allow_online=False)
    table = schedule.tabulated()
    write_json(args.out, table)
    resolved = table["params"]["resolved"]
    print(f"σ* = {resolved['sigma_star']:.4g}, w_max = {resolved['w_max']:.4g}; "
          f"{len(table['sigma'])} grid points written to {args.out}")  # fmt: skip
    if args.plot:
        write_plot(args.plot, lambda: plot_schedule(args.plot, table), args.out)
    return 0
