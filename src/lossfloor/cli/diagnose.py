"""`lossfloor diagnose`: a model's per-σ loss gap to the optimal loss, on paired draws."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from lossfloor.cli.common import Declared, add_data_arguments, add_device_argument

if TYPE_CHECKING:
    from lossfloor.data import Dataset
    from lossfloor.diagnosis import Diagnosis
    from lossfloor.diffusion.denoiser import DenoiserFn
    from lossfloor.floor import Floor
    from lossfloor.optimal import Curve

#: The σ grid and the number of draws without --sigmas, --outer or --curve: the grid spans the
#: optimal-loss schedule's default range [0.002, 80] (``schedule``/``train --gap``), ~2× per step.
DEFAULT_SIGMAS = "0.002:80:16"
DEFAULT_OUTER = 2048


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="a model's loss gap J_θ(σ) − J*(σ)",
        description="Per σ: the model's loss on its training data, the optimal loss on the "
        "same draws, and the gap with its standard error (per element, x0 and target units).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="RUN_DIR | CHECKPOINT | optimal | saved diffusers pipeline or UNet | "
        "python:MODULE:CALLABLE (a factory returning a denoiser with EDM's protocol)",
    )
    add_data_arguments(p)
    _add_draw_options(p)
    _add_evaluation_options(p)
    _add_output_options(p)
    _add_heldout_options(p)
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    p.set_defaults(
        run=run,
        param_options={"heldout": "--heldout", "floor": "--floor"},
        declared=Declared(
            inputs=("--model", "--data", "--curve", "--heldout", "--floor"),
            outputs=("--out", "--csv", "--plot"),
            needs=(("--floor", "--heldout"),),
        ),
    )


def _add_draw_options(p: argparse.ArgumentParser) -> None:
    """The σ grid and the paired draws (x0, ε)."""
    p.add_argument(
        "--sigmas",
        default=None,
        help="σ grid (VE σ): a list 0.1,1,10 or min:max:count, log-spaced (default: "
        f"{DEFAULT_SIGMAS}, or the --curve's grid; without --sigmas, σ outside the model's "
        "range are left out, with a note)",
    )
    p.add_argument(
        "--outer",
        type=int,
        default=None,
        metavar="M",
        help=f"paired draws (x0, ε) per σ (default: {DEFAULT_OUTER}, or the --curve's M)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the draws: sources and ε (default: 0, or the --curve's seed)",
    )
    p.add_argument(
        "--draws",
        choices=("plain", "tilted"),
        default=None,
        help="outer draws: plain ε ~ N(0, I) | tilted (estimate's importance-sampled ε toward "
        "each source's neighbours; every mean weighted by the likelihood ratios) (default: "
        "the --curve's draws, else plain)",
    )


def _add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """How the model runs and where J* comes from."""
    p.add_argument("--batch", type=int, default=256, help="model batch size, in images")
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    add_device_argument(p)
    p.add_argument(
        "--curve",
        default=None,
        metavar="ESTIMATE.json",
        help="take J* from this estimate (lossfloor estimate --out; estimator full, this data, "
        "the same M and seed, plain or tilted draws) instead of computing it; the model's loss "
        "is taken on the estimate's draws, and the gap's ± is then the bound "
        "s.e.(J_θ) + s.e.(J*), not the paired s.e.",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """The files written, and the J* cache."""
    p.add_argument("--out", required=True, metavar="FILE.json", help="result JSON")
    p.add_argument(
        "--csv", default=None, metavar="FILE.csv", help="the table as CSV (units in the header)"
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="PNG: J_θ and J* against σ, gap below"
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute J* instead of reusing $LOSSFLOOR_CACHE/optimal (same draws, same values)",
    )


def _add_heldout_options(p: argparse.ArgumentParser) -> None:
    """The held-out loss and its reading through a floor."""
    p.add_argument(
        "--heldout",
        default=None,
        metavar="SPEC",
        help="held-out data: add the model's held-out loss per σ (its generalisation gap is "
        "held-out − training loss; docs/floor.md)",
    )
    p.add_argument(
        "--floor",
        default=None,
        metavar="FLOOR.json",
        help="with --heldout: read each gap through `lossfloor floor`'s bracket (underfitting "
        "| provable headroom | within the bracket)",
    )


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import check_args, load_data_from_args, resolve_device
    from lossfloor.diagnosis import diagnose
    from lossfloor.floor import Floor
    from lossfloor.models import load_model
    from lossfloor.optimal import Curve
    from lossfloor.optimal.draws import check_outer

    check_args(args)
    curve = None if args.curve is None else Curve.load(args.curve)
    sigmas = _sigmas(args.sigmas, curve)
    outer = _from_curve(args.outer, curve, "outer", DEFAULT_OUTER)
    seed = _from_curve(args.seed, curve, "seed", 0)
    check_outer(outer)
    device = resolve_device(args.device)
    floor_result = None if args.floor is None else Floor.load(args.floor)
    ds = load_data_from_args(args)
    model, info = load_model(args.model, ds, device, ema=not args.no_ema)
    if args.sigmas is None:
        sigmas = _within_range(model, sigmas, "the default grid" if curve is None else args.curve)
    heldout = _heldout(args.heldout, ds, floor_result, sigmas)
    _warn_other_data(args.model, info, ds)
    conditional = bool(info.get("conditional"))
    result = diagnose(
        model,
        ds,
        sigmas,
        outer=outer,
        seed=seed,
        batch=args.batch,
        conditional=conditional,
        use_labels=conditional,
        device=device,
        progress=not args.quiet,
        model_info={k: v for k, v in info.items() if k != "config"},
        cache=not args.no_cache,
        optimal=curve,
        optimal_from=args.curve,
        draws=args.draws,
    )
    if heldout is not None:
        from lossfloor.floor import read_heldout

        result = read_heldout(
            result,
            model,
            ds,
            heldout,
            floor_result=floor_result,
            batch=args.batch,
            use_labels=conditional,
            device=device,
        )
    _report(result, args, ds)
    return 0


def _sigmas(given: str | None, curve: Curve | None) -> list[float]:
    """--sigmas as given, else the --curve's grid, else the default grid."""
    from lossfloor.cli.common import parse_sigmas

    if given is not None:
        return parse_sigmas(given)
    return parse_sigmas(DEFAULT_SIGMAS) if curve is None else curve.sigmas.tolist()


def _heldout(
    spec: str | None, ds: Dataset, floor_result: Floor | None, sigmas: list[float]
) -> Dataset | None:
    """The --heldout dataset, checked against the training data (and the --floor against
    both) before any work."""
    if spec is None:
        return None
    from lossfloor.data import load_dataset
    from lossfloor.floor import check_floor, check_heldout, check_same_kind

    heldout = load_dataset(spec)
    check_heldout(ds.x, heldout.x)
    check_same_kind(ds.std, heldout.std)
    if floor_result is not None:
        check_floor(floor_result, ds, sigmas)
    return heldout


def _warn_other_data(model: str, info: dict[str, Any], ds: Dataset) -> None:
    """A warning on stderr where the model's run was trained on other data than ``ds``."""
    trained_on = info.get("config", {}).get("data", {}).get("sha256")
    if trained_on is not None and trained_on != ds.sha256:
        print(
            f"lossfloor: warning: {model} was trained on other data (sha256 "
            f"{trained_on[:12]}…, not {ds.sha256[:12]}…); its loss on {ds.name} is not comparable "
            "with J* of this data",
            file=sys.stderr,
        )


def _report(result: Diagnosis, args: argparse.Namespace, ds: Dataset) -> None:
    """The table (unless --quiet), the JSON, the CSV and the plot the options ask for (in that
    order: a failing plot leaves the JSON written)."""
    from lossfloor.cli.common import save_result, write_plot
    from lossfloor.plots import plot_diagnosis

    if not args.quiet:
        _print_table(result)
    save_result(result, args.out, args)
    if args.csv:
        result.to_csv(args.csv)
    if args.plot:
        write_plot(
            args.plot,
            lambda: plot_diagnosis(args.plot, result, title=f"{ds.name}: {args.model}"),
            args.out,
        )


def _from_curve(given: int | None, curve: Curve | None, name: str, default: int) -> int:
    """An option's value: as given, else the --curve's (its draws), else the default."""
    if given is not None:
        return given
    saved = None if curve is None else getattr(curve, name)
    return default if saved is None else saved


def _within_range(model: DenoiserFn, sigmas: list[float], grid: str) -> list[float]:
    """The σ of a grid the user did not give (``grid`` names it) within the model's range; a
    note on stderr names those left out (none left: the one-line error of --sigmas)."""
    from lossfloor.diagnosis import split_by_range
    from lossfloor.diffusion.denoiser import read_protocol

    inside, outside = split_by_range(model, sigmas)
    if outside and inside:
        protocol = read_protocol(model)
        listed = ", ".join(f"{s:.4g}" for s in outside)
        print(
            f"lossfloor: note: σ = {listed} of {grid} lie outside the model's range "
            f"[{protocol.sigma_min:g}, {protocol.sigma_max:g}]: left out",
            file=sys.stderr,
        )
        return inside
    return sigmas


def _print_table(result: Diagnosis) -> None:
    """The points and a line saying what each column is."""
    from lossfloor.diagnosis import REL_FLOOR

    print(f"{'sigma':>9} {'model':>11} {'optimal':>11} {'gap':>11} {'±':>9} {'rel':>8}")
    for p, rel in zip(result.points, result.relative_gaps(), strict=True):
        shown = "—" if rel is None else f"{rel:.3g}"
        print(
            f"{p.sigma:9.4g} {p.model_loss:11.5g} {p.optimal_loss:11.5g} "
            f"{p.gap:11.5g} {p.gap_stderr:9.2g} {shown:>8}"
        )
    error = (
        "the paired standard error of the gap"
        if result.paired
        else f"a bound on the gap's standard error, s.e.(J_θ) + s.e.(J*) (J* from "
        f"{result.optimal_from}, without its per-sample values)"
    )
    print(
        "sigma: VE σ; model J_θ, optimal J*, gap = J_θ − J*: per element, x0 units; "
        f"±: {error}; rel: gap / J* (— where J* < {REL_FLOOR:g} × its largest value: J* ≈ 0, "
        "the optimum memorises there and the ratio says nothing)"
    )
    if result.heldout is not None:
        print(f"held-out {result.heldout['name']} (n={result.heldout['n']}), per element:")
        print(f"{'sigma':>9} {'train':>11} {'held-out':>11} {'±':>9} {'reading':>20}")
        for p in result.points:
            print(f"{p.sigma:9.4g} {p.model_loss:11.5g} {p.heldout_model_loss:11.5g} "
                  f"{p.heldout_model_loss_stderr:9.2g} {p.reading or '':>20}")  # fmt: skip
    worst = result.largest_gap
    print(f"largest gap at σ = {worst.sigma:.4g}: {worst.gap:.4g}")
