"""``lossfloor train``: train a diffusion model (preset diffusers UNet) on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lossfloor.cli.common import (
    PARAM_OPTIONS,
    Declared,
    add_data_arguments,
    add_device_argument,
    add_schedule_options,
    build_schedule,
    check_args,
    load_data_from_args,
    parse_sigmas,
    resolve_device,
)
from lossfloor.errors import UserError
from lossfloor.io import read_json
from lossfloor.runfiles import CONFIG

if TYPE_CHECKING:  # heavy imports (torch) only when running
    import torch

    from lossfloor.data import Dataset
    from lossfloor.training.monitor import GapMonitor

# CLI option → TrainConfig field; all default to None so that only options given are used
# (a resumed run takes the rest from its config.json).
_OPTIONS = {
    "batch": int,
    "process": str,
    "target": str,
    "schedule": str,
    "model": str,
    "lr": float,
    "warmup": int,
    "grad_clip": float,
    "weight_decay": float,
    "ema_halflife": float,
    "seed": int,
    "checkpoint_every": int,
    "snapshot_every": int,
    "log_every": int,
}
_HELP = {
    "batch": "images per step (default 64)",
    "process": "forward process: edm, ve, vp, vp-linear, vp-cosine, vp-edm, fm (default edm)",
    "target": "prediction target: x0, eps, score, velocity, v, F (default F)",
    "schedule": "noise schedule p(σ), w(σ): edm, ve, vp, fm, fm-logit-normal, optimal "
    "(from --curve; options below) (default edm)",
    "model": "UNet preset: tiny (~0.27M params at 28×28), small (~1.1M), medium (~6.5M) "
    "(default small)",
    "lr": "AdamW learning rate (default 1e-3)",
    "warmup": "linear learning-rate warm-up, in steps (default 100)",
    "grad_clip": "clip the gradient norm to this (default 1; 0: off)",
    "weight_decay": "AdamW weight decay (default 0)",
    "ema_halflife": "EMA half-life in images (default 10000; ramped up as 5%% of images seen)",
    "seed": "seed of weights, data order, σ and ε (default 0)",
    "checkpoint_every": "overwrite checkpoint-latest.pt every K steps (default 500)",
    "snapshot_every": "also keep checkpoint-<step>.pt every K steps (default 0: none)",
    "log_every": "write a stats.jsonl record every K steps (default 10)",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a diffusion model on a dataset",
        description="Train a preset UNet on --data under any process/target/schedule; "
        "--resume continues a run exactly (bitwise the same as an uninterrupted run). Under "
        "torchrun (torchrun --nproc_per_node K -m lossfloor train ...) the K processes train "
        "with DistributedDataParallel on the same global batch (--batch, split K ways).",
    )
    add_data_arguments(p)
    p.add_argument("--run-dir", required=True, metavar="DIR", help="run directory (created)")
    p.add_argument(
        "--steps", type=int, required=True, metavar="N", help="total optimiser steps of the run"
    )
    for name, kind in _OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=_HELP[name])
    p.add_argument(
        "--conditional",
        action="store_true",
        default=None,
        help="class-conditional model (needs labels)",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        default=None,
        help="EDM2's learned per-σ uncertainty weighting on top of the schedule: loss "
        "w·L/e^u(σ) + u(σ), u a linear map of Fourier features of ln σ trained with the network",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    add_device_argument(p)
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (on a terminal) or progress lines (elsewhere, one per --log-every)",
    )
    p.add_argument(
        "--monitor",
        default=None,
        metavar="CURVE.json",
        help="log the gap to this optimal-loss curve (lossfloor estimate --out) in stats.jsonl",
    )
    p.add_argument("--monitor-every", type=int, default=100, help="steps between gap logs")
    p.add_argument("--monitor-sigmas", default="0.2,1,5", help="σ values the monitor logs")
    p.add_argument("--monitor-n", type=int, default=256, help="fixed draws per monitored σ")
    add_schedule_options(p, train=True)
    p.set_defaults(
        run=run,
        param_options=PARAM_OPTIONS,
        declared=Declared(
            inputs=("--data", "--monitor", "--curve", "--gap"), folders=("--run-dir",)
        ),
    )


def _saved_options(run_dir: Path) -> dict[str, Any]:
    """The options of the run in ``run_dir``; its process, target and schedule as the full
    configs its config.json recorded (``train`` holds them as given, e.g. names)."""
    if not run_dir.is_dir():
        raise UserError(f"--resume: run directory not found: {run_dir}")
    saved = read_json(run_dir / CONFIG)
    if not isinstance(saved, dict) or "train" not in saved:
        raise UserError(f"{run_dir / CONFIG} is not a lossfloor run config")
    resolved = {k: saved[k] for k in ("process", "target", "schedule") if k in saved}
    return {**saved["train"], **resolved}


def _monitor(
    args: argparse.Namespace, dataset: Dataset, conditional: bool, device: torch.device
) -> GapMonitor:
    """The --monitor hook: GapMonitor on the curve, checked to be of this dataset."""
    from lossfloor.optimal import Curve
    from lossfloor.training.monitor import GapMonitor

    if args.monitor_every < 1 or args.monitor_n < 2:
        raise UserError("--monitor-every must be ≥ 1 and --monitor-n ≥ 2")
    curve = Curve.load(args.monitor)
    if (curve.dataset or {}).get("sha256") != dataset.sha256:
        raise UserError(f"--monitor {args.monitor} was computed on another dataset")
    sigmas = parse_sigmas(args.monitor_sigmas, "--monitor-sigmas")
    return GapMonitor(curve, dataset, sigmas, n=args.monitor_n, labels=conditional, device=device,
                      log_every=args.monitor_every)  # fmt: skip


def _optimal_schedule(args: argparse.Namespace, dataset: Dataset) -> Any:
    """--schedule optimal: the schedule of --curve/--gap, the curve checked to be of this data."""
    schedule = build_schedule(args, allow_online=True)
    if (schedule.dataset or {}).get("sha256") != dataset.sha256:
        raise UserError(f"--curve {args.curve} was computed on another dataset than --data")
    return schedule


def run(args: argparse.Namespace) -> int:
    from lossfloor.distributed import launched
    from lossfloor.training import TrainConfig, train

    device = resolve_device(args.device)
    with launched(device) as (group, device):  # under torchrun: one process of a group
        with group.together():
            check_args(args, write=group.main)
            given = {k: getattr(args, k) for k in (*_OPTIONS, "conditional", "uncertainty")}
            options = {k: v for k, v in given.items() if v is not None}
            run_dir = Path(args.run_dir)
            if args.resume:
                options = {**_saved_options(run_dir), **options}
            dataset = load_data_from_args(args)
            if str(options.get("schedule", "")).lower() in ("optimal", "optimal-loss"):
                options["schedule"] = _optimal_schedule(args, dataset).to_config()
            elif args.curve is not None or args.gap is not None:
                raise UserError("--curve and --gap belong to --schedule optimal")
            config = TrainConfig(**{**options, "steps": args.steps})
            monitor = _monitor(args, dataset, config.conditional, device) if args.monitor else None
        last = train(
            config,
            dataset,
            run_dir,
            resume=args.resume,
            device=device,
            progress=False if args.no_progress else None,
            hooks=[monitor] if monitor else [],
        )
    if not group.main:
        return 0
    if last is None:
        print(f"{run_dir}: already trained for {config.steps} steps; raise --steps to continue")
    else:
        print(
            f"{run_dir}: step {last.step}, {last.images} images, loss {last.loss:.4g} "
            f"(x0 units {last.loss_x0:.4g}), {last.seconds:.0f} s training"
        )
    return 0
