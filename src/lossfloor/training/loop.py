"""The trainer: a preset UNet behind the ``Denoiser`` of any process/target, under any schedule.

Per step, with x0 a batch of B training images, σ_i ~ p(σ), ε ~ N(0, I):

  loss = (1/B) Σ_i w(σ_i) · mean_elements (D(x0_i + σ_i ε_i, σ_i, y_i) − x0_i)²

(per element, x0 units; with the matching schedule this equals the target-unit loss, e.g. EDM's
λ(σ)=1/c_out² makes it the F loss). AdamW, linear LR warm-up over ``warmup`` steps, gradient-norm
clipping, EMA (half-life in images). Randomness: data order from a permutation per epoch seeded
by (seed, epoch) — a pure function of the images seen — and σ and ε from two seeded CPU
generators whose states are checkpointed, so a resumed run is bitwise the uninterrupted one.

Run directory: ``config.json`` (everything that defines the run), ``stats.jsonl`` (one record per
log interval), ``checkpoint-latest.pt`` (atomic) and optional ``checkpoint-<step>.pt`` snapshots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossfloor import __version__
from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.errors import UserError
from lossfloor.io import atomic_path, save_with, write_json
from lossfloor.models import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_LATEST,
    check_compatible,
    load_checkpoint,
)
from lossfloor.schedules import get_schedule
from lossfloor.seeding import derived_seed, generator_for
from lossfloor.training.backbone import PRESETS, UNetBackbone, backbone_config, count_parameters
from lossfloor.training.ema import EMA

Tensor = torch.Tensor
Callback = Callable[[int, Denoiser, dict[str, Any]], None]

# Per-σ-bin statistics: 8 log-spaced bins over EDM's sampling range [0.002, 80]; the first and
# last bins are open-ended (they also hold σ below 0.002 and above 80).
SIGMA_BIN_EDGES: list[float] = np.geomspace(0.002, 80.0, 9).tolist()
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "snapshot_every", "log_every")


@dataclass
class TrainConfig:
    """Everything that defines a training run (the device is not part of it)."""

    steps: int
    batch: int = 64
    process: str = "edm"
    target: str = "F"
    schedule: str = "edm"
    model: str = "small"
    conditional: bool = False
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_halflife: float = 10_000.0
    ema_rampup: float | None = 0.05
    sigma_data: float = 0.5
    seed: int = 0
    checkpoint_every: int = 500
    snapshot_every: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.seed >= 0, "--seed must be >= 0"),
            (self.batch >= 1, "--batch must be at least 1"),
            (0 < self.lr <= 1, "--lr must be in (0, 1] (AdamW moves each weight by about lr)"),
            (self.warmup >= 0, "--warmup must be >= 0 steps"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 turns clipping off)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.ema_halflife > 0, "--ema-halflife must be > 0 images"),
            (self.ema_rampup is None or self.ema_rampup > 0, "the EMA ramp-up must be > 0"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1 step"),
            (self.snapshot_every >= 0, "--snapshot-every must be >= 0 (0: no snapshots)"),
            (self.log_every >= 1, "--log-every must be at least 1 step"),
            (self.model in PRESETS, f"--model must be one of: {', '.join(PRESETS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


_STREAM_MODEL, _STREAM_DATA, _STREAM_SIGMA, _STREAM_NOISE = range(4)


class _DataOrder:
    """Index of the k-th image seen: position k mod N of the permutation of epoch ⌊k/N⌋."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = generator_for(self.seed, _STREAM_DATA, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> Tensor:
        out, k = [], start
        while k < start + count:
            epoch, pos = divmod(k, self.n)
            take = min(self.n - pos, start + count - k)
            out.append(self._permutation(epoch)[pos : pos + take])
            k += take
        return torch.cat(out)


def _run_config(config: TrainConfig, dataset: Dataset, denoiser: Denoiser, device: str) -> dict:
    """config.json: the training options and everything they resolve to."""
    net = denoiser.net
    return {
        "lossfloor_version": __version__,
        "train": asdict(config),
        "data": dataset.describe(),
        "process": denoiser.process.to_config(),
        "target": denoiser.target.to_config(),
        "schedule": get_schedule(config.schedule).to_config(),
        "model": net.config,
        "parameters": count_parameters(net),
        "optimizer": {
            "name": "AdamW",
            "lr": config.lr,
            "betas": list(ADAM_BETAS),
            "eps": ADAM_EPS,
            "weight_decay": config.weight_decay,
            "warmup_steps": config.warmup,
            "grad_clip": config.grad_clip,
        },
        "ema": {"halflife_images": config.ema_halflife, "rampup_ratio": config.ema_rampup},
        "sigma_bin_edges": SIGMA_BIN_EDGES,
        "device": device,
    }


class _Accumulator:
    """Sums over one log interval: weighted loss, x0 loss, per-σ-bin x0 loss and counts."""

    def __init__(self, device: torch.device) -> None:
        self.inner_edges = torch.tensor(SIGMA_BIN_EDGES[1:-1], dtype=torch.float64)
        nbins = len(SIGMA_BIN_EDGES) - 1
        self.bin_sum = torch.zeros(nbins, dtype=torch.float64, device=device)
        self.bin_count = torch.zeros(nbins, dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.images = 0
        self.seconds = 0.0

    def add(self, loss: Tensor, sigma: Tensor, per_sample_x0: Tensor, seconds: float) -> None:
        bins = torch.bucketize(sigma, self.inner_edges).to(self.bin_sum.device)
        self.bin_sum.index_add_(0, bins, per_sample_x0.detach().double())
        self.bin_count.index_add_(0, bins, torch.ones_like(per_sample_x0, dtype=torch.float64))
        self.loss_sum += loss.detach().double()
        self.steps += 1
        self.images += len(sigma)
        self.seconds += seconds

    def record(self, step: int, images: int, lr: float, total_seconds: float) -> dict[str, Any]:
        counts = self.bin_count.cpu().tolist()
        sums = self.bin_sum.cpu().tolist()
        return {
            "step": step,
            "images": images,
            "loss": float(self.loss_sum) / self.steps,
            "loss_x0": sum(sums) / sum(counts),
            "bin_loss_x0": [s / c if c else None for s, c in zip(sums, counts, strict=True)],
            "bin_count": [int(c) for c in counts],
            "lr": lr,
            "seconds": total_seconds,
            "step_seconds": self.seconds / self.steps,
            "images_per_s": self.images / self.seconds if self.seconds > 0 else None,
        }


class Trainer:
    """One training run in ``run_dir``; ``run()`` trains up to ``config.steps``.

    ``callbacks`` are called as ``cb(step, ema_denoiser, record)`` every ``callback_every``
    steps (on the EMA weights, after the step; a callback may add JSON-able keys to ``record``,
    which is then written to stats.jsonl). The trainer draws no randomness from the global torch
    RNG after building the net, so a callback that leaves the weights alone never changes the
    training result.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        run_dir: str | Path,
        *,
        resume: bool = False,
        device: str | torch.device = "cpu",
        callbacks: Sequence[Callback] = (),
        callback_every: int = 0,
        progress: bool | None = None,
    ) -> None:
        if dataset.x.ndim != 4:
            raise UserError(f"training needs images (N×C×H×W); {dataset.name} holds N×D vectors")
        if config.conditional and dataset.labels is None:
            raise UserError(f"--conditional needs labels, but {dataset.name} has none")
        if callbacks and callback_every < 1:
            raise UserError("callbacks need callback_every >= 1 step")
        self.config, self.dataset = config, dataset
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.callbacks, self.callback_every = list(callbacks), callback_every
        self.progress = progress
        self.schedule = get_schedule(config.schedule)
        num_classes = dataset.num_classes if config.conditional else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(config.seed, _STREAM_MODEL))
            net = UNetBackbone(backbone_config(dataset.shape, config.model, num_classes))
        self.net = net.to(self.device)
        self.params = list(self.net.parameters())
        self.denoiser = Denoiser(self.net, config.process, config.target, config.sigma_data)
        self.ema = EMA(self.net, config.ema_halflife, config.ema_rampup)
        self.ema_denoiser = Denoiser(
            self.ema.model, config.process, config.target, config.sigma_data
        ).eval()
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            weight_decay=config.weight_decay,
            foreach=True,
        )
        self.g_sigma = generator_for(config.seed, _STREAM_SIGMA)
        self.g_noise = generator_for(config.seed, _STREAM_NOISE)
        self.order = _DataOrder(dataset.n, config.seed)
        self.x = dataset.x.to(self.device)
        self.labels = dataset.labels.to(self.device) if config.conditional else None
        self.step = 0
        self.seconds = 0.0
        self.run_config = _run_config(config, dataset, self.denoiser, str(self.device))
        if resume:
            self._resume()
        else:
            self._start()

    # ----- run directory -------------------------------------------------------------------
    @property
    def latest_path(self) -> Path:
        return self.run_dir / CHECKPOINT_LATEST

    @property
    def stats_path(self) -> Path:
        return self.run_dir / "stats.jsonl"

    def _start(self) -> None:
        if self.latest_path.exists():
            raise UserError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or choose "
                "another --run-dir"
            )
        write_json(self.run_dir / "config.json", self.run_config)
        with atomic_path(self.stats_path) as tmp:
            tmp.write_text("")

    def _resume(self) -> None:
        if not self.run_dir.is_dir():
            raise UserError(f"--resume: run directory not found: {self.run_dir}")
        if not self.latest_path.exists():
            raise UserError(
                f"--resume: {self.run_dir} has no {CHECKPOINT_LATEST}; start a new run without "
                "--resume"
            )
        ckpt = load_checkpoint(self.latest_path, "cpu")
        saved = ckpt["config"]
        check_compatible(saved, self.dataset)
        identity = {k: v for k, v in self.dataset.describe().items() if k != "name"}
        if any(saved["data"].get(k) != v for k, v in identity.items()):
            raise UserError(
                f"--resume: {self.dataset.name} is not the data this run was trained on "
                f"({saved['data']['name']}, sha256 {saved['data']['sha256'][:12]}…); pass that data"
            )
        for key, old in saved["train"].items():
            new = getattr(self.config, key)
            if key not in RESUMABLE_FIELDS and old != new:
                raise UserError(
                    f"--resume: the run was trained with {key}={old!r}, not {new!r}; drop the "
                    "option or start a new run"
                )
        self.net.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.g_sigma.set_state(ckpt["rng"]["sigma"])
        self.g_noise.set_state(ckpt["rng"]["noise"])
        self.step, self.seconds = int(ckpt["step"]), float(ckpt["seconds"])
        write_json(self.run_dir / "config.json", self.run_config)
        kept = []
        if self.stats_path.exists():
            for line in self.stats_path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut off by an interrupted write
        with atomic_path(self.stats_path) as tmp:
            tmp.write_text("".join(kept))

    def _save(self) -> None:
        for name, module in (("model", self.net), ("EMA", self.ema.model)):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise self._diverged(self.step, f"the {name} weights became non-finite")
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "images": self.step * self.config.batch,
            "seconds": self.seconds,
            "config": self.run_config,
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"sigma": self.g_sigma.get_state(), "noise": self.g_noise.get_state()},
        }
        save_with(self.latest_path, lambda p: torch.save(ckpt, p))
        every = self.config.snapshot_every
        if every and self.step % every == 0:
            snapshot = self.run_dir / f"checkpoint-{self.step:08d}.pt"
            save_with(snapshot, lambda p: torch.save(ckpt, p))

    def _diverged(self, step: int, what: str) -> UserError:
        kept = (
            f"the last good checkpoint {self.latest_path} is kept"
            if self.latest_path.exists()
            else "no checkpoint had been written yet"
        )
        return UserError(
            f"training stopped at step {step}: {what}; {kept}; lower --lr (or raise "
            "--warmup) and start again"
        )

    # ----- training ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up: lr·min(1, (step+1)/warmup) for the 0-based step index."""
        warmup = self.config.warmup
        return self.config.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def _train_step(self, acc: _Accumulator) -> None:
        start = time.perf_counter()
        c, b = self.config, self.config.batch
        idx = self.order.indices(self.step * b, b).to(self.device)
        x0 = self.x[idx]
        labels = None if self.labels is None else self.labels[idx]
        sigma = self.schedule.sample(b, self.g_sigma)
        weight = self.schedule.weight(sigma).to(self.device, torch.float32)
        eps = torch.randn(x0.shape, generator=self.g_noise).to(self.device)
        s = sigma.to(self.device, torch.float32)
        x = x0 + s.view(-1, 1, 1, 1) * eps
        per_sample = (self.denoiser(x, s, labels) - x0).square().mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        if not torch.isfinite(loss):
            raise self._diverged(self.step + 1, f"the loss is {float(loss.detach())}")
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            if not torch.isfinite(norm):
                raise self._diverged(self.step + 1, f"the gradient norm is {float(norm)}")
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.net, self.step * b, b)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        acc.add(loss, sigma, per_sample, seconds)

    def run(self) -> dict[str, Any] | None:
        """Train to ``config.steps``; the last stats record (None if there was nothing to do)."""
        from tqdm import tqdm

        c = self.config
        last = None
        acc = _Accumulator(self.device)
        self.net.train()
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            disable=None if self.progress is None else not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            with open(self.stats_path, "a") as stats:
                while self.step < c.steps:
                    self._train_step(acc)
                    bar.update(1)
                    step = self.step
                    call = bool(self.callbacks) and step % self.callback_every == 0
                    ckpt = step % c.checkpoint_every == 0 or step == c.steps
                    if not (call or ckpt or step % c.log_every == 0):
                        continue
                    record = acc.record(step, step * c.batch, self.lr_at(step - 1), self.seconds)
                    if call:
                        started = time.perf_counter()
                        for cb in self.callbacks:
                            cb(step, self.ema_denoiser, record)
                        record["callback_seconds"] = time.perf_counter() - started
                    stats.write(json.dumps(record) + "\n")
                    stats.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                    if ckpt:
                        self._save()
                    last, acc = record, _Accumulator(self.device)
        finally:
            bar.close()
        return last


def train(
    config: TrainConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    callbacks: Sequence[Callback] = (),
    callback_every: int = 0,
    progress: bool | None = None,
) -> dict[str, Any] | None:
    """Train (or resume) the run in ``run_dir``; returns the last stats record."""
    trainer = Trainer(
        config,
        dataset,
        run_dir,
        resume=resume,
        device=device,
        callbacks=callbacks,
        callback_every=callback_every,
        progress=progress,
    )
    return trainer.run()
