"""`lossfloor estimate`: the optimal loss J*(σ) of a dataset over a σ grid."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from lossfloor.cli.common import (
    add_data_arguments,
    load_data_from_args,
    parse_sigmas,
    resolve_device,
)
from lossfloor.errors import UserError
from lossfloor.io import read_json, write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="optimal loss J*(σ) of a dataset",
        description="Estimate the optimal loss J*(σ) (per element, VE σ, x0 units) of a dataset.",
    )
    add_data_arguments(p)
    p.add_argument("--conditional", action="store_true", help="posterior within the source's class")
    p.add_argument("--sigmas", default="0.01:100:25", help="list 0.1,1,10 or min:max:count (log)")
    p.add_argument("--estimator", default="full", help="full | snis | dol | cdol")
    p.add_argument("--inner", type=int, default=None, metavar="L", help="inner set size (N/10)")
    p.add_argument("--C", default=None, help="cdol correction: number | paper (4N/L) | balanced")
    p.add_argument("--replace", action="store_true", help="draw the random part with replacement")
    p.add_argument(
        "--source-in-random",
        choices=["auto", "yes", "no"],
        default="auto",
        help="may the random part contain the query's source (auto: snis yes, dol/cdol no)",
    )
    p.add_argument("--layout", default="shared", help="shared | independent random inner sets")
    p.add_argument("--share", type=int, default=256, help="queries sharing one random set")
    p.add_argument("--outer", type=int, default=None, metavar="M", help="outer samples (N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--form", default="auto", help="auto | closed | direct | combined")
    p.add_argument("--process", default="edm", help="ve | edm | vp | vp-cosine | vp-edm | fm")
    p.add_argument("--target", default="F", help="x0 | eps | score | velocity | v | F")
    p.add_argument("--sigma-data", type=float, default=0.5, help="σ_data of the F target")
    p.add_argument("--total", default=None, help="schedule for the total J*: edm | ve | vp | fm")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="auto", help="float32 | float64 | auto (fp64 at small σ)")
    p.add_argument("--tile-mb", type=float, default=32.0, help="memory of one logits tile (MiB)")
    p.add_argument("--out", default=None, help="result JSON (checkpointed per σ; reruns resume)")
    p.add_argument("--plot", default=None, help="PNG of J*(σ)")
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    p.set_defaults(run=run)


def _partial_path(out: str) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


def run(args: argparse.Namespace) -> int:
    from lossfloor.diffusion import get_process, get_target
    from lossfloor.optimal import estimate_curve, make_estimator
    from lossfloor.plots import plot_optimal_loss
    from lossfloor.schedules import get_schedule

    sigmas = parse_sigmas(args.sigmas)
    process = get_process(args.process)
    target = get_target(args.target, sigma_data=args.sigma_data)
    schedule = get_schedule(args.total) if args.total else None
    device = resolve_device(args.device)
    if args.tile_mb <= 0:
        raise UserError(f"--tile-mb {args.tile_mb}: must be > 0")
    if args.outer is not None and args.outer < 1:
        raise UserError(f"--outer {args.outer}: need at least 1 outer sample (M ≥ 1)")
    ds = load_data_from_args(args)
    source_in_random = {"auto": None, "yes": False, "no": True}[args.source_in_random]
    estimator = make_estimator(
        args.estimator,
        ds.n,
        inner=args.inner,
        C=args.C,
        replace=args.replace,
        exclude_source=source_in_random,
        layout=args.layout,
        share=args.share,
    )
    record: dict[str, Any] = {
        "dataset": {**ds.describe(), "conditional": args.conditional},
        "process": process.to_config(),
        "target": target.to_config(),
    }
    key = hashlib.sha256(
        json.dumps(
            [record, estimator.params(), args.outer, args.seed, args.form, args.dtype],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    done: dict[float, dict[str, Any]] = {}
    partial = _partial_path(args.out) if args.out else None
    if partial is not None and partial.is_file():
        saved = read_json(partial)
        if saved.get("key") == key:
            done = {p["sigma"]: p for p in saved["points"]}
            if not args.quiet:
                print(f"resuming: {len(done)} σ already computed in {partial}", file=sys.stderr)

    def checkpoint(point: dict[str, Any]) -> None:
        done[point["sigma"]] = point
        if partial is not None:
            write_json(partial, {"key": key, "points": list(done.values())})

    curve = estimate_curve(
        ds.x,
        sigmas,
        estimator,
        labels=ds.labels,
        conditional=args.conditional,
        outer=args.outer,
        seed=args.seed,
        form=args.form,
        precision=args.dtype,
        device=device,
        process=process,
        target=target,
        schedule=schedule,
        tile_bytes=int(args.tile_mb * 2**20),
        record=record,
        done=done,
        on_point=checkpoint,
        progress=not args.quiet,
    )
    rec = curve.record
    if not args.quiet:
        _print_table(rec, args.target)
    if args.plot:
        plot_optimal_loss(
            args.plot,
            [(rec["estimator"]["name"], curve.sigmas, curve.values, curve.stderrs)],
            data_variance=rec["data_variance"],
            title=f"{ds.name}: optimal loss (n={ds.n}, M={rec['estimator']['outer']})",
        )
    if args.out:
        write_json(args.out, rec)
        if partial is not None and partial.exists():
            partial.unlink()
    return 0


def _print_table(rec: dict[str, Any], target: str) -> None:
    head = f"J*({target})"
    print(f"{'sigma':>10} {'t':>10} {'J*(x0)':>12} {'stderr':>10} {head:>12} {'s':>7}")
    for p in rec["points"]:
        tgt = p["optimal_loss_target"]
        print(
            f"{p['sigma']:10.4g} {p['t']:10.4g} {p['optimal_loss']:12.6g} {p['stderr']:10.3g} "
            f"{(tgt if tgt is not None else float('nan')):12.6g} {p['seconds']:7.2f}"
        )
    print(f"data variance per element: {rec['data_variance']:.6g}")
    if rec["total"]:
        t = rec["total"]
        print(
            f"total under {t['schedule']['name']}: {t['optimal_loss']:.6g} ± {t['stderr']:.2g} "
            f"(quadrature ±{t['quadrature_error']:.2g}, tail {t['tail']:.2g})"
        )
