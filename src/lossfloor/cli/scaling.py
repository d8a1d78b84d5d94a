"""`lossfloor scaling`: power laws of the loss with and without the optimal loss subtracted."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from lossfloor.cli.common import Declared, add_data_arguments, add_device_argument
from lossfloor.errors import ParameterError, UserError

if TYPE_CHECKING:
    from lossfloor.scaling import ScalingFit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaling",
        help="scaling laws of J and of J − J* (fit, collect)",
        description="Fit J = β·F^α, J − J* = β·F^α and J = β·F^α + c per σ and for the total "
        "loss (fit), or measure the rows from training runs (collect).",
    )
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))

    f = actions.add_parser(
        "fit",
        help="fit RUNS.csv against an optimal-loss estimate",
        description="RUNS.csv: run,params,flops,images_seen,sigma,loss (sigma empty for the "
        "total loss). Per σ and for the total: raw, subtracted and offset power-law fits, "
        "pooled over runs and checkpoints.",
    )
    f.add_argument("--runs", required=True, metavar="RUNS.csv", help="the runs' losses (above)")
    f.add_argument(
        "--optimal",
        required=True,
        metavar="ESTIMATE.json",
        help="J*(σ) of the runs' data (lossfloor estimate --out)",
    )
    f.add_argument("--x", default="flops", choices=["flops", "params", "images_seen"],
                   help="the power law's variable F")  # fmt: skip
    f.add_argument("--sigma", type=float, nargs="+", default=None, metavar="S",
                   help="fit only these σ (default: each σ in the file and the total)")  # fmt: skip
    f.add_argument("--plot", default=None, metavar="FILE.png", help="both fits per σ, log axes")
    f.add_argument("--out", default=None, metavar="FILE.json", help="the fits as JSON")
    f.add_argument("--csv", default=None, metavar="FILE.csv",
                   help="one row per fit as CSV (units in the header)")  # fmt: skip
    f.set_defaults(
        run=run_fit,
        declared=Declared(inputs=("--runs", "--optimal"), outputs=("--plot", "--out", "--csv")),
    )

    c = actions.add_parser(
        "collect",
        help="measure RUNS.csv from training runs",
        description="Every checkpoint of every run: per-σ loss on the training set on fixed "
        "draws (diagnose; J* cached), the total loss under the run's schedule, parameters, "
        "training FLOPs (FlopCounterMode on one step × steps).",
    )
    c.add_argument(
        "run_dir",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (lossfloor train --run-dir); every checkpoint of each is measured",
    )
    add_data_arguments(c)
    c.add_argument("--sigmas", default="0.02:80:13", help="list or min:max:count (log-spaced)")
    c.add_argument("--outer", type=int, default=2048, metavar="M", help="paired draws per σ")
    c.add_argument("--seed", type=int, default=0, help="seed of the draws (sources, ε)")
    c.add_argument("--batch", type=int, default=256, help="model batch size")
    add_device_argument(c)
    c.add_argument("--out", required=True, metavar="RUNS.csv", help="the rows (fit reads it)")
    c.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    c.set_defaults(
        run=run_collect, declared=Declared(inputs=("RUN_DIR", "--data"), outputs=("--out",))
    )


def _under_options(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a ParameterError reported under its option (``--<param>``): the top-level
    mapping sees only ``scaling``'s own options, not its actions'."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ParameterError as exc:
            raise UserError(exc.for_option("--" + exc.param.replace("_", "-"))) from None

    return wrapped


@_under_options
def run_fit(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import check_args, save_result
    from lossfloor.optimal import Curve
    from lossfloor.scaling import fit_scaling, read_runs, total_left_out

    check_args(args)
    rows = read_runs(args.runs)
    curve = Curve.load(args.optimal)
    result = fit_scaling(rows, curve, x=args.x, sigmas=args.sigma)
    if total_left_out(rows, curve, args.sigma):
        print(
            f"lossfloor: note: the rows of {args.runs} hold a total loss but {args.optimal} has "
            "no total: the total is left out (estimate J* with --total and the runs' schedule "
            "to fit it)",
            file=sys.stderr,
        )
    _print_table(result)
    if args.out:
        save_result(result, args.out, args)
    if args.csv:
        result.to_csv(args.csv)
    if args.plot:
        from lossfloor.plots import plot_scaling

        plot_scaling(args.plot, result)
    return 0


@_under_options
def run_collect(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import check_args, load_data_from_args, parse_sigmas, resolve_device
    from lossfloor.optimal.draws import check_outer
    from lossfloor.scaling import write_runs
    from lossfloor.scaling.collection import collect

    check_args(args)
    sigmas = parse_sigmas(args.sigmas)
    check_outer(args.outer)
    device = resolve_device(args.device)
    ds = load_data_from_args(args)
    rows = collect(args.run_dir, ds, sigmas, outer=args.outer, seed=args.seed, batch=args.batch,
                   device=str(device), progress=not args.quiet)  # fmt: skip
    write_runs(args.out, rows)
    if not args.quiet:
        print(f"{len(rows)} rows from {len(args.run_dir)} run(s) → {args.out}")
    return 0


def _print_table(result: ScalingFit) -> None:
    print(f"F = {result.x}")
    print(f"{'sigma':>8} {'J*':>10} {'n':>4} | {'ρ raw':>7} {'α raw':>8} | {'ρ sub':>7} "
          f"{'α sub':>8} {'drop':>4} | {'c':>9} {'± se':>8}")  # fmt: skip
    for f in result.fits:
        s = "total" if f.sigma is None else f"{f.sigma:.4g}"
        off = f.offset
        c = "—" if off is None else f"{off.c:9.4g}"
        se = "—" if off is None or off.c_stderr is None else f"{off.c_stderr:8.2g}"
        print(f"{s:>8} {f.optimal_loss:10.4g} {len(f.x):4d} | {f.raw.rho:7.4f} "
              f"{f.raw.alpha:8.4f} | {f.subtracted.rho:7.4f} {f.subtracted.alpha:8.4f} "
              f"{len(f.subtracted.dropped):4d} | {c:>9} {se:>8}")  # fmt: skip
