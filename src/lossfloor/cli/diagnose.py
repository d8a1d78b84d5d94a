"""`lossfloor diagnose`: a model's per-σ loss gap to the optimal loss, on paired draws."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from lossfloor.cli.common import add_data_arguments

if TYPE_CHECKING:
    from lossfloor.diagnosis import Diagnosis


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
    p.add_argument("--sigmas", default="0.02:80:13", help="list or min:max:count (log-spaced)")
    p.add_argument("--outer", type=int, default=2048, metavar="M", help="paired draws per σ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256, help="model batch size")
    p.add_argument("--no-ema", action="store_true", help="use raw weights, not the EMA")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--plot", default=None, help="PNG: J_θ and J* against σ, gap below")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute J* instead of reusing $LOSSFLOOR_CACHE/optimal (same draws, same values)",
    )
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run, param_options={"heldout": "--heldout", "floor": "--floor"})


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import (
        check_outputs,
        load_data_from_args,
        parse_sigmas,
        resolve_device,
        write_plot,
    )
    from lossfloor.data import load_dataset
    from lossfloor.diagnosis import diagnose
    from lossfloor.errors import UserError
    from lossfloor.floor import Floor, check_floor, check_heldout, read_heldout
    from lossfloor.models import load_model
    from lossfloor.optimal.outer import check_outer
    from lossfloor.plots import plot_diagnosis

    check_outputs(args, "--out", "--plot")
    sigmas = parse_sigmas(args.sigmas)
    check_outer(args.outer)
    device = resolve_device(args.device)
    if args.floor is not None and args.heldout is None:
        raise UserError("--floor: reading a gap through a floor needs --heldout SPEC")
    floor_result = None if args.floor is None else Floor.load(args.floor)
    ds = load_data_from_args(args)
    heldout = None if args.heldout is None else load_dataset(args.heldout)
    if heldout is not None:
        check_heldout(ds.x, heldout.x)
        if floor_result is not None:
            check_floor(floor_result, ds, sigmas)
    model, info = load_model(args.model, ds, device, ema=not args.no_ema)
    trained_on = info.get("config", {}).get("data", {}).get("sha256")
    if trained_on is not None and trained_on != ds.sha256:
        print(
            f"lossfloor: warning: {args.model} was trained on other data (sha256 "
            f"{trained_on[:12]}…, not {ds.sha256[:12]}…); its loss on {ds.name} is not comparable "
            "with J* of this data",
            file=sys.stderr,
        )
    conditional = bool(info.get("conditional"))
    result = diagnose(
        model,
        ds,
        sigmas,
        outer=args.outer,
        seed=args.seed,
        batch=args.batch,
        conditional=conditional,
        use_labels=conditional,
        device=device,
        progress=not args.quiet,
        model_info={k: v for k, v in info.items() if k != "config"},
        cache=not args.no_cache,
    )
    if heldout is not None:
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
    if not args.quiet:
        _print_table(result)
    result.save(args.out)
    if args.plot:
        write_plot(
            args.plot,
            lambda: plot_diagnosis(args.plot, result, title=f"{ds.name}: {args.model}"),
            args.out,
        )
    return 0


def _print_table(result: Diagnosis) -> None:
    print(f"{'sigma':>9} {'model':>11} {'optimal':>11} {'gap':>11} {'±':>9} {'rel':>8}")
    for p in result.points:
        rel = p.relative_gap
        print(
            f"{p.sigma:9.4g} {p.model_loss:11.5g} {p.optimal_loss:11.5g} "
            f"{p.gap:11.5g} {p.gap_stderr:9.2g} "
            f"{(rel if rel is not None else float('nan')):8.3g}"
        )
    if result.heldout is not None:
        print(f"held-out {result.heldout['name']} (n={result.heldout['n']}), per element:")
        print(f"{'sigma':>9} {'train':>11} {'held-out':>11} {'±':>9} {'reading':>20}")
        for p in result.points:
            print(f"{p.sigma:9.4g} {p.model_loss:11.5g} {p.heldout_model_loss:11.5g} "
                  f"{p.heldout_model_loss_stderr:9.2g} {p.reading or '':>20}")  # fmt: skip
    worst = result.largest_gap
    print(f"largest gap at σ = {worst.sigma:.4g}: {worst.gap:.4g}")
