"""Scaling study (issue 10): UNets of four widths on a Fashion-MNIST subset, checkpoints along
training, then ``lossfloor scaling collect`` and ``fit`` (docs/experiments/scaling.md).

Resumable: each phase skips what is done (a finished run, an existing RUNS.csv, estimate or
fit) and a run interrupted mid-way resumes from its latest checkpoint (bitwise, the trainer's
exact resume). Widths are registered as extra entries of ``lossfloor.training.PRESETS`` (the
trainer's table of backbone shapes: channels (w, 2w, 2w), one ResNet block per level, no
attention, as the ``tiny`` preset); the run's config.json records the full UNet config, so
``load_run`` rebuilds the nets without this script.

    python experiments/scaling/run.py --out runs/scaling [--steps 180] [--limit 2000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lossfloor.cli import main as lossfloor
from lossfloor.data import load_dataset
from lossfloor.scaling import read_runs, write_runs
from lossfloor.training import PRESETS, TrainConfig, train
from lossfloor.training.rundir import RunDir

WIDTHS = (4, 8, 12, 16)
SIGMAS = "0.02,0.1,0.3,1,3,10,80"  # includes a high σ (10) and covers EDM's p(σ) bulk


def register_widths() -> None:
    for w in WIDTHS:
        PRESETS.setdefault(f"w{w}", {"channels": (w, 2 * w, 2 * w), "layers": 1,
                                     "attention": (), "groups": 4, "head": 8})  # fmt: skip


def finished(run: Path, steps: int) -> bool:
    import torch

    latest = RunDir(run).latest
    return latest.exists() and torch.load(latest, weights_only=True)["step"] >= steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--steps", type=int, default=180)
    p.add_argument("--every", type=int, default=15, help="snapshot interval (steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--outer", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu | cuda (training and collecting)")
    p.add_argument("--phase", choices=["all", "train", "analyse"], default="all")
    args = p.parse_args()
    out = Path(args.out)
    register_widths()
    data = ["--data", args.data, "--limit", str(args.limit)]
    if args.phase in ("all", "train"):
        ds = load_dataset(args.data, limit=args.limit)
        for w in WIDTHS:
            run = out / f"w{w}"
            if finished(run, args.steps):
                continue
            t0 = time.time()
            cfg = TrainConfig(steps=args.steps, batch=args.batch, model=f"w{w}", lr=2e-3,
                              warmup=10, ema_halflife=500.0, checkpoint_every=args.every,
                              snapshot_every=args.every, log_every=args.every)  # fmt: skip
            train(
                cfg, ds, run, resume=RunDir(run).latest.exists(), device=args.device, progress=False
            )
            print(f"w{w}: {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
    if args.phase in ("all", "analyse"):
        runs_csv, est = out / "runs.csv", out / "optimal.json"
        if not est.exists():
            # J* per σ on the same data, and its total under the runs' schedule (EDM, σ_d 0.5)
            lossfloor(["estimate", *data, "--sigmas", SIGMAS, "--outer", str(args.outer),
                       "--total", "edm", "--out", str(est), "--quiet"])  # fmt: skip
        if not runs_csv.exists():
            runs = [str(out / f"w{w}") for w in WIDTHS]
            lossfloor(["scaling", "collect", *runs, *data, "--sigmas", SIGMAS, "--outer",
                       str(args.outer), "--device", args.device, "--out", str(runs_csv),
                       "--quiet"])  # fmt: skip
        # F = compute over every checkpoint; F = model size over each run's last checkpoint
        final_csv = out / "runs-final.csv"
        rows = read_runs(runs_csv)
        last = {r.run: max(int(q.extra["step"]) for q in rows if q.run == r.run) for r in rows}
        write_runs(final_csv, [r for r in rows if int(r.extra["step"]) == last[r.run]])
        for x, csv in (("flops", runs_csv), ("params", final_csv)):
            lossfloor(["scaling", "fit", "--runs", str(csv), "--optimal", str(est),
                       "--x", x, "--out", str(out / f"fit-{x}.json"),
                       "--plot", str(out / f"fit-{x}.png")])  # fmt: skip


if __name__ == "__main__":
    main()
