"""`lossfloor floor`: is J*(σ) converged in N? J* on nested subsets, held-out upper bounds, and a
per-σ verdict (docs/floor.md)."""

from __future__ import annotations

import argparse
import sys

from lossfloor.cli.common import (
    Declared,
    add_data_arguments,
    add_device_argument,
    add_dtype_argument,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "floor",
        help="generalising floor: J* converged in N, and held-out bounds",
        description="Bracket the population's optimal loss per σ: J* of the training set "
        "(and of nested random subsets, N/2^k … N) below, the held-out losses of the training "
        "set's optimal denoiser and of its smoothed version above; say where J* is converged in N.",
    )
    add_data_arguments(p)
    p.add_argument(
        "--heldout",
        required=True,
        metavar="SPEC",
        help="held-out data, same item shape (e.g. fashion-mnist:test)",
    )
    _add_bracket_options(p)
    _add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    p.set_defaults(
        run=run,
        param_options={"precision": "--dtype", "heldout": "--heldout"},
        declared=Declared(
            inputs=("--data", "--heldout"),
            outputs=("--out", "--csv", "--plot"),
            partial=("--out",),
            needs=(("--restart", "--out"),),
        ),
    )


def _add_bracket_options(p: argparse.ArgumentParser) -> None:
    """The σ grid, the nested subsets, the draws and the smoothing of the bracket."""
    p.add_argument("--sigmas", default="0.05:80:12", help="list 0.1,1,10 or min:max:count (log)")
    p.add_argument("--levels", type=int, default=5, help="subset sizes N/2^(levels−1) … N")
    p.add_argument("--sizes", default=None, help="explicit subset sizes n1,n2,… (N is added)")
    p.add_argument("--repeats", type=int, default=3, help="random subsets per size below N")
    p.add_argument(
        "--outer",
        type=int,
        default=2048,
        metavar="M",
        help="outer draws per J* (at most the subset size) and per held-out loss",
    )
    p.add_argument(
        "--bandwidth",
        default="auto",
        help="smoothed denoiser's kernel width b: auto (leave-one-out on the "
        "training set) | a number ≥ 0 | none",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of subsets, draws and noise")
    p.add_argument(
        "--draws",
        default="auto",
        help="outer noise of each J*: tilted | plain | auto (tilted for the full estimator; "
        "see lossfloor estimate --help)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Device, precision and the files written."""
    add_device_argument(p)
    add_dtype_argument(p)
    p.add_argument(
        "--out", default=None, help="FLOOR.json (checkpointed to FLOOR.json.partial; reruns resume)"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard FLOOR.json.partial of a run with other options",
    )
    p.add_argument("--plot", default=None, help="FLOOR.png: the bracket and the N-trend")
    p.add_argument(
        "--csv",
        default=None,
        metavar="FILE.csv",
        help="the per-σ bracket as CSV (units in the header)",
    )


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import (
        check_args,
        load_data_from_args,
        parse_bandwidth,
        parse_sigmas,
        resolve_device,
        save_result,
        write_plot,
    )
    from lossfloor.data import load_dataset
    from lossfloor.errors import UserError
    from lossfloor.floor import check_bandwidth, floor

    check_args(args)
    sigmas = parse_sigmas(args.sigmas)
    bandwidth = parse_bandwidth(args.bandwidth)
    check_bandwidth(bandwidth)
    sizes = None
    if args.sizes is not None:
        try:
            sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--sizes {args.sizes}: expected integers n1,n2,…") from None
    device = resolve_device(args.device)
    train = load_data_from_args(args)
    heldout = load_dataset(args.heldout)
    result = floor(
        train,
        heldout,
        sigmas,
        levels=args.levels,
        sizes=sizes,
        repeats=args.repeats,
        outer=args.outer,
        seed=args.seed,
        draws=args.draws,
        bandwidth=bandwidth,
        precision=args.dtype,
        device=device,
        checkpoint=None if args.out is None else args.out + ".partial",
        restart=args.restart,
        progress=not args.quiet,
    )
    if not args.quiet:
        _print_table(result)
    _warn_crossing(result)
    if args.out:
        save_result(result, args.out, args)
    if args.csv:
        result.to_csv(args.csv)
    if args.plot:
        from lossfloor.plots import plot_floor

        title = f"{train.name} (N={train.n}) vs held-out {heldout.name} (n={heldout.n})"
        write_plot(args.plot, lambda: plot_floor(args.plot, result, title), args.out)
    return 0


def _print_table(result) -> None:
    print("per element, x0 units; lower = J* of the training set, upper = least held-out bound")
    print(
        f"{'sigma':>9} {'lower':>11} {'±':>8} {'upper':>11} {'±':>8} {'from':>8} "
        f"{'rise N/2→N':>11} {'verdict':>10} {'J*_∞ (extrap.)':>15}"
    )
    for p in result.points:
        print(
            f"{p.sigma:9.4g} {p.lower:11.5g} {p.lower_stderr:8.2g} {p.upper:11.5g} "
            f"{p.upper_stderr:8.2g} {p.upper_source:>8} {p.rise:11.3g} {p.verdict:>10} "
            f"{p.extrapolated:9.5g} ±{p.extrapolated_stderr:.2g}"
        )


def _warn_crossing(result) -> None:
    """One stderr line per kind of lower > upper (FloorPoint.crossing)."""
    for kind, why in (("within error", "noise: both bound J*_pop in expectation only"),
                      ("beyond error", "an inconsistency: is the held-out set drawn like the "
                       "training set?")):  # fmt: skip
        at = [f"{p.sigma:.4g}" for p in result.points if p.crossing == kind]
        if at:
            print(f"lossfloor: warning: lower > upper at σ = {', '.join(at)}, {kind} ({why})",
                  file=sys.stderr)  # fmt: skip
