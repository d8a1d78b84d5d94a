"""A plain PyTorch + diffusers training loop (UNet2DModel, DDPMScheduler, ε-prediction), with
lossfloor's per-σ gap to the optimal loss in TensorBoard: the lines marked "# lossfloor" are
all it adds to the loop.

    python examples/diffusers_unconditional.py --data digits --steps 2000 --logdir runs/ex
    tensorboard --logdir runs/ex     # lossfloor/gap/sigma=…, lossfloor/ratio/sigma=…, the image

The gap needs J*(σ) of the training data over the scheduler's σ range (σ̃ = √((1 − ᾱ)/ᾱ):
0.01 … 157 for DDPM's linear table): ``--curve CURVE.json`` (``lossfloor estimate --data digits
--sigmas 0.01:160:17 --out CURVE.json``), else it is estimated here once (digits: seconds) and
saved in the log folder. For Fashion-MNIST (``--data fashion-mnist``, 28×28) estimate the curve
beforehand with ``lossfloor estimate`` (``--limit`` for a subset, the same here).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

import lossfloor


def make_unet(channels: int, size: int, widths: tuple[int, int] = (32, 64)) -> UNet2DModel:
    """A small UNet2DModel (two levels of ``widths`` channels; one down-sampling, so any even
    size: 8×8 digits, 28×28 Fashion-MNIST) for size×size images."""
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=widths, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=widths[0] // 4,
    )  # fmt: skip


def train(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    steps: int,
    *,
    batch: int = 64,
    lr: float = 2e-3,
    tracker: lossfloor.GapTracker | None = None,
    writer=None,
    log_every: int = 100,
    generator: torch.Generator | None = None,
) -> None:
    """The usual diffusers loop: x_t = add_noise(x0, ε, t), loss = MSE(ε̂, ε). With ``lr=0``
    the weights stay (the losses are still the loop's own: a frozen model's)."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr) if lr > 0 else None
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(images), (batch,), generator=generator)
        x0 = images[rows]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                                  generator=generator)  # fmt: skip
        noisy = scheduler.add_noise(x0, noise, timesteps)
        with torch.set_grad_enabled(optimizer is not None):
            pred = unet(noisy, timesteps).sample
            per_sample = (pred - noise).square().mean(dim=(1, 2, 3))
        if optimizer is not None:
            optimizer.zero_grad()
            per_sample.mean().backward()
            optimizer.step()
        if tracker is not None:
            tracker.update(per_sample, timesteps=timesteps)  # lossfloor
        if writer is not None and tracker is not None and step % log_every == 0:
            from lossfloor.integrations.tensorboard import log_tensorboard

            log_tensorboard(writer, tracker, step)  # lossfloor
            writer.add_scalar("loss", float(per_sample.detach().mean()), step)


def curve_for(data: lossfloor.Dataset, path: Path, outer: int) -> lossfloor.Curve:
    """J*(σ) of the data on 17 σ over DDPM's range 0.01 … 160, estimated once into ``path``."""
    if path.exists():
        return lossfloor.Curve.load(path)
    sigmas = torch.logspace(math.log10(0.01), math.log10(160.0), 17).tolist()
    curve = lossfloor.estimate_curve(data, sigmas, "full", outer=outer, seed=0, progress=False)
    curve.save(path)
    return curve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", help="a lossfloor dataset spec")
    p.add_argument("--limit", type=int, default=None, help="the first N images only")
    p.add_argument("--curve", default=None, help="J* curve JSON (default: estimated here)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--logdir", default="runs/diffusers-example")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from torch.utils.tensorboard import SummaryWriter

    data = lossfloor.load_dataset(args.data, limit=args.limit)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    curve_path = Path(args.curve) if args.curve else logdir / "curve.json"
    curve = curve_for(data, curve_path, outer=min(len(data.x), 2048))
    torch.manual_seed(args.seed)
    images = data.x.float()
    unet = make_unet(images.shape[1], images.shape[-1])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    tracker = lossfloor.GapTracker(curve, scheduler=scheduler, data=data)  # lossfloor
    writer = SummaryWriter(str(logdir))
    train(unet, scheduler, images, args.steps, batch=args.batch, tracker=tracker, writer=writer,
          log_every=args.log_every, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    writer.close()
    for row in tracker.summary():
        if row["gap"] is not None:
            print(f"σ = {row['sigma']:8.4f}  loss {row['loss']:.4f}  J* {row['optimal_loss']:.4f}"
                  f"  gap {row['gap']:.4f} ± {row['gap_stderr'] or 0:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
