"""``lossfloor sample``: draw images from a trained run with EDM's Heun (or Euler) sampler."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from lossfloor import __version__
from lossfloor.cli.common import add_device_argument, check_outputs, resolve_device
from lossfloor.errors import UserError
from lossfloor.io import save_with

if TYPE_CHECKING:
    import torch


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample images from a trained run",
        description="Deterministic EDM sampler on the Karras σ schedule (σ 80 → 0.002, ρ = 7). "
        "Image i uses seed SEED+i, so samples do not depend on --batch.",
    )
    p.add_argument(
        "--run", dest="run_path", required=True, metavar="RUN", help="run directory or checkpoint"
    )
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--steps", type=int, default=18, help="σ levels N (Heun: 2N−1 evaluations)")
    p.add_argument(
        "--sampler", choices=("heun", "euler"), default="heun", help="Heun (2nd order) or Euler"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument(
        "--labels",
        default=None,
        metavar="LIST",
        help="class labels, comma-separated, repeated over the samples "
        "(conditional runs only; default 0, 1, …, C−1 repeated)",
    )
    p.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    add_device_argument(p)
    p.add_argument("--out-grid", default=None, metavar="FILE.png", help="PNG grid of the samples")
    p.add_argument(
        "--out-npz",
        default=None,
        metavar="FILE.npz",
        help="x: float32 N×C×H×W in [−1, 1] (clipped), y: labels, seeds, meta",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _labels(text: str | None, n: int, num_classes: int | None) -> torch.Tensor | None:
    """The label of each sample: the list (or 0..C−1) repeated to n entries."""
    import torch

    if num_classes is None:
        if text is not None:
            raise UserError("--labels: this run is unconditional; drop --labels")
        return None
    try:
        values = list(range(num_classes)) if text is None else [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--labels {text!r}: expected comma-separated integers") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"--labels: {bad[0]} is not a class of this run (0..{num_classes - 1})")
    return torch.tensor(values, dtype=torch.long).repeat(-(-n // len(values)))[:n]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lossfloor.models import load_run
    from lossfloor.sampling import RHO, SIGMA_MAX, SIGMA_MIN, generate, image_grid

    if args.out_grid is None and args.out_npz is None:
        raise UserError("give --out-grid FILE.png and/or --out-npz FILE.npz")
    check_outputs(args, "--out-grid", "--out-npz")
    if args.n < 1:
        raise UserError(f"--n {args.n}: must be at least 1")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    device = resolve_device(args.device)
    denoiser, config = load_run(args.run_path, ema=not args.raw, device=device)
    labels = _labels(args.labels, args.n, config["model"]["num_classes"])
    seeds = list(range(args.seed, args.seed + args.n))
    x = generate(
        denoiser,
        config["model"]["image_shape"],
        seeds,
        steps=args.steps,
        sampler=args.sampler,
        labels=labels,
        batch=args.batch,
        device=device,
        progress=False if args.no_progress else None,
    ).clamp(-1, 1)
    if args.out_grid is not None:
        grid = image_grid(x)
        save_with(args.out_grid, lambda p: grid.save(p, format="PNG"))
    if args.out_npz is not None:
        meta = {
            "run": str(args.run_path),
            "ema": not args.raw,
            "sampler": args.sampler,
            "steps": args.steps,
            "sigma_min": SIGMA_MIN,
            "sigma_max": SIGMA_MAX,
            "rho": RHO,
            "seeds": [args.seed, args.seed + args.n - 1],
            "data": config["data"],
            "lossfloor_version": __version__,
        }
        arrays = {"x": x.numpy(), "seeds": np.asarray(seeds, dtype=np.int64)}
        if labels is not None:
            arrays["y"] = labels.numpy()
        arrays["meta"] = np.asarray(json.dumps(meta))

        def save(path):
            with open(path, "wb") as f:
                np.savez(f, **arrays)

        save_with(args.out_npz, save)
    print(f"{args.n} samples ({args.sampler}, {args.steps} steps) from {args.run_path}")
    return 0
