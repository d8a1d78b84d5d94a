"""Train the small Fashion-MNIST classifier whose features give lossfloor's FD-classifier.

    python benchmarks/train_classifier.py   # → src/lossfloor/assets/fmnist_classifier.{pt,json}

AdamW with a one-cycle learning rate, random horizontal flips, seeded; the test accuracy is
measured on the full test split and on its first 2,000 images (the test suite re-checks the
latter).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lossfloor import __version__
from lossfloor.data import load_dataset
from lossfloor.evaluation.classifier import (
    FEATURE_DIM,
    IMAGE_SHAPE,
    SmallClassifier,
    accuracy,
    default_weights_path,
)
from lossfloor.io import save_with, write_json

CHECK_SUBSET = 2000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--test-data", default="fashion-mnist:test")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--out", type=Path, default=default_weights_path())
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = load_dataset(args.data)
    test = load_dataset(args.test_data)
    if train.shape != IMAGE_SHAPE or train.labels is None or test.labels is None:
        raise SystemExit(f"need labelled {IMAGE_SHAPE} images, got {train.shape}")

    model = SmallClassifier()
    steps_per_epoch = train.n // args.batch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(train.n, generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in bar:
            idx = order[step * args.batch : (step + 1) * args.batch]
            x, y = train.x[idx], train.labels[idx]
            if not args.no_flip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test.x, test.labels):.4f}")
    seconds = time.time() - start

    model.eval()
    acc = accuracy(model, test.x, test.labels)
    acc_subset = accuracy(model, test.x[:CHECK_SUBSET], test.labels[:CHECK_SUBSET])
    save_with(args.out, lambda tmp: torch.save(model.state_dict(), tmp))
    meta = {
        "architecture": "SmallClassifier: conv32-pool-conv64-conv64-pool-conv128-GAP-linear",
        "feature_dim": FEATURE_DIM,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_data": train.describe(),
        "test_data": test.describe(),
        "test_accuracy": acc,
        f"test_accuracy_first_{CHECK_SUBSET}": acc_subset,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "flip_augmentation": not args.no_flip,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "command": "python " + shlex.join(["benchmarks/train_classifier.py", *sys.argv[1:]]),
        "lossfloor_version": __version__,
        "torch_version": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    write_json(args.out.with_suffix(".json"), meta)
    print(f"test accuracy {acc:.4f} (first {CHECK_SUBSET}: {acc_subset:.4f}); {seconds:.0f} s")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
