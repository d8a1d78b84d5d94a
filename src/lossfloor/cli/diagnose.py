"""`lossfloor diagnose`: a model's per-σ loss gap to the optimal loss, on paired draws."""

from __future__ import annotations

import argparse

from lossfloor.cli.common import (
    add_data_arguments,
    load_data_from_args,
    parse_sigmas,
    resolve_device,
)
from lossfloor.errors import UserError
from lossfloor.io import write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="a model's loss gap J_θ(σ) − J*(σ)",
        description="Per σ: the model's loss on its training data, the optimal loss on the "
        "same draws, and the gap with its standard error (per element, x0 and target units).",
    )
    p.add_argument(
        "--model", required=True, help="RUN_DIR | CHECKPOINT | optimal | saved diffusers pipeline"
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lossfloor.diagnosis import diagnose
    from lossfloor.models import load_model
    from lossfloor.plots import plot_diagnosis

    sigmas = parse_sigmas(args.sigmas)
    if args.outer < 2:
        raise UserError(f"--outer {args.outer}: need at least 2 paired draws")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be ≥ 1")
    device = resolve_device(args.device)
    ds = load_data_from_args(args)
    model, info = load_model(args.model, ds, device, ema=not args.no_ema)
    conditional = bool(info.get("conditional"))
    rec = diagnose(
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
        record={"model": {k: v for k, v in info.items() if k != "config"}},
    )
    if not args.quiet:
        print(f"{'sigma':>9} {'model':>11} {'optimal':>11} {'gap':>11} {'±':>9} {'rel':>8}")
        for p in rec["points"]:
            rel = p["relative_gap"]
            print(
                f"{p['sigma']:9.4g} {p['model_loss']:11.5g} {p['optimal_loss']:11.5g} "
                f"{p['gap']:11.5g} {p['gap_stderr']:9.2g} "
                f"{(rel if rel is not None else float('nan')):8.3g}"
            )
        worst = max(rec["points"], key=lambda p: p["gap"])
        print(f"largest gap at σ = {worst['sigma']:.4g}: {worst['gap']:.4g}")
    write_json(args.out, rec)
    if args.plot:
        plot_diagnosis(args.plot, rec, title=f"{ds.name}: {args.model}")
    return 0
