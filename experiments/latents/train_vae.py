"""The latent study's VAE (issue 23, item 5): a small diffusers ``AutoencoderKL`` trained on the
60,000 Fashion-MNIST training images, saved with ``save_pretrained`` for ``lossfloor encode``.

Architecture: 1 → 1 channels, 3 blocks (8, 16, 16 channels, 1 resnet each, GroupNorm of 4
groups), 4 latent channels, downsampling ×4: a 28×28 image is a 4×7×7 latent (196 dims), and
the decoder gives 28×28 back (no padding, so decoded images meet the 28×28 classifier features
of ``lossfloor fid``). Pixels in [−1, 1] (diffusers' convention).

Loss per batch: mean over pixels of (x̂ − x)² + KL_WEIGHT · mean over latent elements of
KL(N(m, s²) ‖ N(0, 1)) = ½(m² + s² − 1 − ln s²), x̂ decoded from z = m + s·ε. KL_WEIGHT 1e-2
per element (in per-image sums, Σ(x̂ − x)² + 4e-2·Σ KL; LDM's VAEs use 1e-6 there, with other
reconstruction losses) keeps the posterior std well above 0 (measured: ``posterior_std_mean``
in vae.json).
Adam, lr 2e-3 with 20 warm-up steps and a cosine decay to 10 %, batch 64, 300 steps (a third
of an epoch): the budget is 2 CPU cores for ≤ 20 minutes (vae.json records the wall time,
which other jobs on a shared machine lengthen).

Seeded: the initial weights (torch.manual_seed(seed)), the data order (a permutation per epoch
from SeedSequence([seed, epoch])) and each step's ε (a generator seeded by (seed, step)), so a
resumed run (train-state.pt in OUT, saved every 50 steps, after the last step and on
Ctrl-C/SIGTERM) sees the data and noise an uninterrupted one sees (the weights bit for bit on
the same machine and thread count, as far as torch's CPU kernels are deterministic; not
checked here). At the end OUT holds config.json and
diffusion_pytorch_model.safetensors, and vae.json the run's numbers: seed, steps, wall time,
the reconstruction MSE of the 10,000 test images (decoded posterior means, clamped to [−1, 1],
per pixel in [−1, 1] and in [0, 1] units), and over the training set per latent channel the
mean posterior std, the mean and std of the posterior means (the normalisation a user would
pick, as EDM2's raw_mean/raw_std) and the std of the sampled latents √(Var m + E s²).

    nice -n 10 python experiments/latents/train_vae.py --out docs/experiments/latents/vae
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossfloor.data import load_dataset
from lossfloor.io import save_with, write_json
from lossfloor.progress import progress_bar

SEED = 0
STEPS = 300
BATCH = 64
LR = 2e-3
WARMUP = 20
KL_WEIGHT = 1e-2
SAVE_EVERY = 50
STATE = "train-state.pt"
CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 28,
}


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine from LR down to LR/10 at ``steps``."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch_indices(seed: int, step: int, batch: int, n: int) -> np.ndarray:
    """The images of ``step``: consecutive slices of a permutation per epoch."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    return order[k * batch : (k + 1) * batch]


def kl_per_element(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(m, s²) ‖ N(0, 1)) per element: ½(m² + s² − 1 − ln s²)."""
    var = std.square()
    return 0.5 * (mean.square() + var - 1 - var.log())


def train(out: Path, seed: int, steps: int, threads: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    x = load_dataset("fashion-mnist").x
    torch.manual_seed(seed)
    vae = AutoencoderKL(**CONFIG)
    opt = torch.optim.Adam(vae.parameters(), lr=LR)
    step, elapsed = 0, 0.0
    state_path = out / STATE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if state["seed"] != seed or state["steps"] != steps:
            raise SystemExit(f"{state_path} is a run with other --seed/--steps; delete it")
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        logging.info("resuming at step %d (%.0f s so far)", step, elapsed)

    def save() -> None:
        so_far = elapsed + time.monotonic() - started
        state = {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "elapsed": so_far, "seed": seed, "steps": steps}  # fmt: skip
        save_with(state_path, lambda p: torch.save(state, p))

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    started = time.monotonic()
    bar = progress_bar(total=steps, initial=step, desc="train VAE", unit="step")
    vae.train()
    try:
        while step < steps and not stop:
            idx = batch_indices(seed, step, BATCH, len(x))
            batch = x[torch.from_numpy(idx)]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps)
            dist = vae.encode(batch).latent_dist
            noise = torch.Generator().manual_seed(seed * 1_000_003 + step)
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=noise)
            recon = vae.decode(z).sample
            mse = (recon - batch).square().mean()
            loss = mse + KL_WEIGHT * kl_per_element(dist.mean, dist.std).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 25 == 0:
                std = dist.std.detach().mean().item()
                bar.set_postfix(mse=f"{mse.item():.4f}", std=f"{std:.3f}")
            if step % SAVE_EVERY == 0 and step < steps:
                save()
    except KeyboardInterrupt:
        save()
        raise SystemExit(f"interrupted at step {step}; the same command resumes") from None
    bar.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    save()  # a failure below (evaluation, saving) reruns only what follows the last step
    if stop:
        raise SystemExit(f"stopped at step {step}; the same command resumes")
    wall = elapsed + time.monotonic() - started
    vae.eval()
    vae.save_pretrained(out)  # the weights first: `lossfloor encode` can start on them
    record = {
        "seed": seed,
        "steps": steps,
        "batch": BATCH,
        "lr": LR,
        "warmup": WARMUP,
        "kl_weight_per_element": KL_WEIGHT,
        "train_wall_seconds": round(wall, 1),
        "torch_threads": threads,
        "config": CONFIG,
        "params": sum(p.numel() for p in vae.parameters()),
        **evaluate(vae, x),
    }
    write_json(out / "vae.json", record)
    state_path.unlink(missing_ok=True)
    return record


@torch.inference_mode()
def evaluate(vae: Any, train_x: torch.Tensor, chunk: int = 1000) -> dict[str, Any]:
    """The test set's reconstruction MSE (decoded posterior means, clamped to [−1, 1]) and the
    training set's per-channel latent statistics (float64 sums)."""
    test = load_dataset("fashion-mnist:test").x
    sq, sq_raw = 0.0, 0.0
    for lo in range(0, len(test), chunk):
        xb = test[lo : lo + chunk]
        recon = vae.decode(vae.encode(xb).latent_dist.mean).sample
        sq += float((recon.clamp(-1, 1) - xb).double().square().sum())
        sq_raw += float((recon - xb).double().square().sum())
    mse = sq / test.numel()
    c = CONFIG["latent_channels"]
    sums = {k: torch.zeros(c, dtype=torch.float64) for k in ("m", "m2", "s", "s2")}
    count = 0
    for lo in range(0, len(train_x), chunk):
        dist = vae.encode(train_x[lo : lo + chunk]).latent_dist
        m, s = dist.mean.double(), dist.std.double()
        sums["m"] += m.sum((0, 2, 3))
        sums["m2"] += m.square().sum((0, 2, 3))
        sums["s"] += s.sum((0, 2, 3))
        sums["s2"] += s.square().sum((0, 2, 3))
        count += m.numel() // c
    mean = sums["m"] / count
    var_m = sums["m2"] / count - mean.square()
    mean_s2 = sums["s2"] / count
    return {
        "test_recon_mse_pm1": mse,
        "test_recon_mse_01": mse / 4,
        "test_recon_mse_pm1_unclamped": sq_raw / test.numel(),
        "posterior_std_mean": (sums["s"] / count).tolist(),
        "posterior_std_rms": mean_s2.sqrt().tolist(),
        "latent_mean_mean": mean.tolist(),
        "latent_mean_std": var_m.sqrt().tolist(),
        "latent_sample_std": (var_m + mean_s2).sqrt().tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments/latents/vae"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    record = train(args.out, args.seed, args.steps, args.threads)
    logging.info("%s", {k: v for k, v in record.items() if k != "config"})


if __name__ == "__main__":
    main()
