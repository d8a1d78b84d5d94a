"""The trainer: a preset UNet behind the ``Denoiser`` of any process/target, under an objective.

Per step, with x0 a batch of B training images, the objective (``training.loss``; by default
``DenoisingLoss`` of the config's schedule) draws σ_i ~ p(σ), ε_i ~ N(0, I) and the trainer
minimises

  loss = (1/B) Σ_i w(σ_i) · mean_elements (D(x0_i + σ_i ε_i, σ_i, y_i) − x0_i)²

with AdamW, linear LR warm-up over ``warmup`` steps, gradient-norm clipping and an EMA (half-life
in images). With ``uncertainty`` the objective is ``UncertaintyLoss`` (EDM2's learned per-σ
weighting): its parameters join the AdamW optimizer and the checkpoint. After each step the hooks
(``training.hooks``) get the batch's σ and losses: the statistics (``training.stats``), the
objective's (an online gap), then the caller's; at each log step they add to the stats record.
Randomness: data order from a permutation per epoch seeded by (seed, epoch) — a pure function of
the images seen — and, for Gaussian items (VAE latents, ``Dataset.std``), x0 = m + s·z with z
drawn afresh at every step from (seed, LATENT, step) (``training.order.Batches``), and σ and ε
from two seeded CPU generators whose states are checkpointed with the objective's state, the
sums of the log interval under way (the statistics' state, "stats") and the other hooks' states
("hooks", by ``state_key``; absent where none has state), so a resumed run is bitwise the
uninterrupted one, its stats.jsonl too (timings aside).
checkpoint-latest.pt is written every ``checkpoint_every`` steps, at the end, and with each
snapshot (every ``snapshot_every`` steps, whatever ``checkpoint_every`` is); a stop request
(SIGINT, SIGTERM) ends the run after the step under way has been logged and checkpointed as
usual, then saves its state there.

Data parallelism (torch.distributed set up, e.g. by torchrun; ``lossfloor.distributed``): process
r of K trains on rows [rB/K, (r+1)B/K) of the same global batch — the same image indices and the
same σ and ε draws as one process (every process draws the whole batch's, ``part=`` of the
objective) — through DistributedDataParallel, whose gradient average equals one process's batch
gradient up to reduction order. The batch loss and the stats are summed over processes; rank 0
writes config.json, checkpoints and stats; every process loads the checkpoint on resume. Errors
are agreed on (start-up, every step's forward and its hooks, each hook at a log step and at a
checkpoint, every write), so a failure on one process stops all with the same message.

Parts: ``training.order`` (the data order, the batches' x0), ``training.objective`` (the
objective, checked), ``training.checkpoint`` (what a checkpoint holds: save, resume,
interrupt), ``training.signals`` (stop requests); files: ``training.rundir``; options:
``training.config``; stats records: ``training.stats``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

import torch

from lossfloor.backbone import UNetBackbone, backbone_config
from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.distributed import current
from lossfloor.errors import ParameterError, UserError
from lossfloor.progress import interactive, progress_bar
from lossfloor.seeding import Stream, derived_seed, generator_for
from lossfloor.training import checkpoint
from lossfloor.training.config import ADAM_BETAS, ADAM_EPS, TrainConfig, run_config
from lossfloor.training.ema import EMA
from lossfloor.training.hooks import Batch, Hook, LogStep, TrainingHook, check_hooks
from lossfloor.training.loss import DenoisingLoss
from lossfloor.training.objective import objective_parameters, resolve_objective
from lossfloor.training.order import Batches
from lossfloor.training.rundir import RunDir
from lossfloor.training.signals import StopRequests
from lossfloor.training.stats import StatsAccumulator, StatsRecord

__all__ = ["Callback", "TrainConfig", "Trainer", "train"]

log = logging.getLogger(__name__)
Tensor = torch.Tensor
Callback = Callable[[int, Denoiser, dict[str, Any]], None]


class _CallbackHook(Hook):
    """Callback number ``index``, ``cb(step, ema_denoiser, record)``, as a hook of cadence
    ``every``: on rank 0 it gets the record as a dict, and what it adds or changes there is
    logged."""

    def __init__(self, callback: Callback, every: int, index: int) -> None:
        self.callback, self.log_every, self.index = callback, every, index

    @property
    def state_key(self) -> str:
        return f"callback {self.index}"

    def on_log(self, log: LogStep) -> Mapping[str, Any]:
        if not log.main:
            return {}
        view = dict(log.record)
        self.callback(log.step, log.model, view)
        return view


class Trainer:
    """One training run in ``run_dir``; ``run()`` trains up to ``config.steps``.

    ``objective`` (default ``DenoisingLoss`` of ``config.schedule``) is any objective with the
    ``DenoisingLoss`` interface; its schedule must be the one ``config.schedule`` names, and it
    is checked against the model's process, target and σ_data. ``hooks`` (``training.hooks``)
    get every batch after its step (``Batch``: σ, per-sample losses, the global batch loss, the
    trained denoiser) and each log step (``LogStep``: the EMA denoiser, in eval mode, and the
    stats record as a dict); the JSON-able values a hook returns are added to the record (its
    ``extra``). A log step is every ``config.log_every`` steps, at each checkpoint, and every
    ``log_every`` steps of a hook with its own cadence (≥ 1), which is called only then; a hook
    with log_every = 0 is called at every log step. ``callback_seconds``, the hooks' time, is
    recorded where a hook with its own cadence ran or one logged values (on rank 0).
    ``callbacks`` (the older form of a hook that only logs) are called as
    ``cb(step, ema_denoiser, record)`` every ``callback_every`` steps on rank 0 and may add keys
    to ``record``. The trainer draws no randomness from the global torch RNG after building the
    net, so a hook that leaves the weights alone never changes the training result.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        run_dir: str | Path,
        *,
        resume: bool = False,
        device: str | torch.device = "cpu",
        objective: DenoisingLoss | None = None,
        hooks: Sequence[TrainingHook] = (),
        callbacks: Sequence[Callback] = (),
        callback_every: int = 0,
        progress: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.group = current(self.device)
        shown = f"{dataset.name}, sha256 {dataset.sha256[:12]}…"
        self.group.check_same("data", dataset.sha256, shown)
        with self.group.together():
            self._setup(config, dataset, run_dir, resume, objective, hooks, callbacks,
                        callback_every)  # fmt: skip
        self.group.check_same("checkpoints", f"step {self.step}")
        self.train_denoiser = self._data_parallel()
        self.progress = progress if self.group.main else False  # one bar: rank 0's
        self.stop = StopRequests()

    def _setup(
        self,
        config: TrainConfig,
        dataset: Dataset,
        run_dir: str | Path,
        resume: bool,
        objective: DenoisingLoss | None,
        hooks: Sequence[TrainingHook],
        callbacks: Sequence[Callback],
        callback_every: int,
    ) -> None:
        """Checks, model, objective, hooks, draws and the run directory (started or resumed)."""
        if dataset.x.ndim != 4:
            raise UserError(f"training needs images (N×C×H×W); {dataset.name} holds N×D vectors")
        if config.conditional and dataset.labels is None:
            raise UserError(f"a conditional model needs labels, but {dataset.name} has none")
        if callbacks and callback_every < 1:
            raise ParameterError("callback_every", callback_every, "callbacks need at least 1")
        self.config, self.dataset = config, dataset
        self.rundir = RunDir(run_dir)
        self.rows = self.group.part(config.batch)
        self._build_model()
        self.objective = resolve_objective(
            objective, config, self.denoiser, self.group.world, self.device
        )
        self.stats = StatsAccumulator(self.device, self.group)
        wrapped = [_CallbackHook(cb, callback_every, i) for i, cb in enumerate(callbacks)]
        self.hooks = check_hooks([*self.objective.hooks(), *wrapped, *hooks])
        self._build_optimizer()
        self.g_sigma = generator_for(config.seed, Stream.SIGMA)
        self.g_noise = generator_for(config.seed, Stream.NOISE)
        self.batches = Batches(dataset, config.seed, config.batch, config.conditional, self.device)
        self.step = 0
        self.seconds = 0.0
        self.saved_step = -1  # the step of the last checkpoint written (-1: none yet)
        self.run_config = {
            **run_config(
                config, dataset, self.denoiser, self.net, self.objective.schedule, str(self.device)
            ),
            "processes": self.group.world,
        }
        if resume:
            checkpoint.resume(self)
        elif self.group.main:
            self.rundir.start(self.run_config)

    # ----- setup ---------------------------------------------------------------------------
    def _build_model(self) -> None:
        """Net (seeded from the config alone), its Denoiser and EMA copy."""
        c, dataset = self.config, self.dataset
        num_classes = dataset.num_classes if c.conditional else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(c.seed, Stream.MODEL))
            net = UNetBackbone(backbone_config(dataset.shape, c.model, num_classes))
        self.net = net.to(self.device)
        self.params = list(self.net.parameters())
        self.denoiser = Denoiser(self.net, c.process, c.target, c.sigma_data)
        self.ema = EMA(self.net, c.ema_halflife, c.ema_rampup)
        self.ema_denoiser = Denoiser(self.ema.model, c.process, c.target, c.sigma_data).eval()

    def _build_optimizer(self) -> None:
        """AdamW over the net's parameters, then the objective's learnable ones (if any: they
        share the learning rate and warm-up; as in EDM2 the gradient clipping is the net's
        alone, so the net's steps are clipped as without them)."""
        c = self.config
        self.optimizer = torch.optim.AdamW(
            [*self.params, *objective_parameters(self.objective)],
            lr=c.lr,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            weight_decay=c.weight_decay,
            foreach=True,
        )

    def _data_parallel(self) -> Denoiser:
        """The denoiser the steps train through: under data parallelism, the net wrapped in
        DistributedDataParallel (it averages the gradients over processes)."""
        if self.group.world == 1:
            return self.denoiser
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        net = DistributedDataParallel(self.net, device_ids=ids)
        c = self.config
        return Denoiser(net, c.process, c.target, c.sigma_data)

    # ----- training ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up: lr·min(1, (step+1)/warmup) for the 0-based step index."""
        warmup = self.config.warmup
        return self.config.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def _train_step(self, hooks: Sequence[TrainingHook]) -> None:
        """One optimiser step on the next batch (this process's rows of it); hands it to
        ``hooks`` with the batch loss: the mean over processes of their rows' mean losses. The
        processes agree on a stop request (``self.stop.agreed``) in the same all-reduce."""
        start = time.perf_counter()
        b, lo = self.config.batch, self.rows[0]
        x0, labels = self.batches.take(self.step, self.rows)
        part = {} if self.group.world == 1 else {"part": (lo, b)}
        with self.group.together():
            losses = self.objective(
                self.train_denoiser, x0, labels, g_sigma=self.g_sigma, g_noise=self.g_noise, **part
            )
            loss = losses.loss.mean()
        batch_loss, agreed = self.group.mean_and_any(loss.detach(), self.stop.requested)
        self.stop.agreed = agreed
        if not torch.isfinite(batch_loss):
            raise self.rundir.diverged(self.step + 1, f"the loss is {float(batch_loss)}")
        self._optimize(loss)
        self.step += 1
        self.ema.update(self.net, self.step * b, b)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        batch = Batch(
            sigma=losses.sigma,
            loss_x0=losses.loss_x0.detach(),
            loss=losses.loss.detach(),
            batch_loss=batch_loss,
            model=self.denoiser,
            step=self.step,
            seconds=seconds,
        )
        with self.group.together():
            for hook in hooks:
                hook.on_batch(batch)

    def _optimize(self, loss: Tensor) -> None:
        """Backward, gradient clipping and the AdamW step at the warm-up learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            if not torch.isfinite(norm):
                raise self.rundir.diverged(self.step + 1, f"the gradient norm is {float(norm)}")
        self.optimizer.step()

    def _cadence_due(self, step: int) -> bool:
        """Whether a hook with its own cadence logs at ``step``."""
        return any(h.log_every and step % h.log_every == 0 for h in self.hooks)

    def _log(self) -> StatsRecord:
        """The record of the interval ending now: the statistics' values (summed over the
        processes), then what each hook due at this step adds (``extra``)."""
        step = self.step
        main = self.group.main
        with self.group.together():
            own = self.stats.on_log(LogStep(step, self.ema_denoiser, MappingProxyType({}), main))
        record = StatsRecord(step=step, images=step * self.config.batch, lr=self.lr_at(step - 1),
                             seconds=self.seconds, **own)  # fmt: skip
        view, timed = record.to_json(), False
        started = time.perf_counter()
        for hook in self.hooks:
            if hook.log_every and step % hook.log_every:
                continue
            with self.group.together():
                added = hook.on_log(LogStep(step, self.ema_denoiser, MappingProxyType(view), main))
            view.update(added)
            timed = timed or bool(hook.log_every) or bool(added)
        if not timed:
            return record
        record = StatsRecord.from_json(view)
        if main:
            record.callback_seconds = time.perf_counter() - started
        return record

    def _stop_now(self, after_step: bool) -> bool:
        """Whether to stop between steps: one process as soon as it is asked; several processes
        after a step in which any had been asked by the end of its forward pass, so that all
        stop after the same step."""
        if self.group.world == 1:
            return self.stop.requested
        return after_step and self.stop.agreed

    def _stats_file(self) -> AbstractContextManager[TextIO | None]:
        """stats.jsonl, opened to append on rank 0 (the others write nothing)."""
        return open(self.rundir.stats, "a") if self.group.main else nullcontext()

    def run(self) -> StatsRecord | None:
        """Train to ``config.steps``; the last stats record (None if there was nothing to do;
        under data parallelism callbacks run, and add to it, on rank 0 only)."""
        c = self.config
        last = None
        fed = [self.stats, *self.hooks]
        self.net.train()
        lines = self.progress is None and not interactive()  # no bar: a line per log interval
        bar = progress_bar(
            total=c.steps, initial=self.step, enabled=self.progress, unit="step", dynamic_ncols=True
        )
        try:
            with self._stats_file() as stats, self.stop:
                while self.step < c.steps:
                    if self._stop_now(after_step=False):
                        raise checkpoint.interrupted(self)
                    self._train_step(fed)
                    bar.update(1)
                    step = self.step
                    ckpt = step % c.checkpoint_every == 0 or step == c.steps
                    snapshot = bool(c.snapshot_every) and step % c.snapshot_every == 0
                    if self._cadence_due(step) or ckpt or step % c.log_every == 0:
                        record = self._log()
                        with self.group.together():
                            if stats is not None:  # rank 0's file
                                stats.write(json.dumps(record.to_json()) + "\n")
                                stats.flush()
                        bar.set_postfix(loss=f"{record.loss:.4g}")
                        if lines:
                            log.info("%s", _progress_line(record, c.steps))
                        last = record
                    if ckpt or snapshot:
                        checkpoint.save(self)
                    if step < c.steps and self._stop_now(after_step=True):
                        raise checkpoint.interrupted(self)
        finally:
            bar.close()
        return last


def _progress_line(record: StatsRecord, steps: int) -> str:
    """One line per log interval where stderr is not a terminal (a log file, a job's output)."""
    speed = "" if record.images_per_s is None else f", {record.images_per_s:.0f} images/s"
    return (
        f"train: step {record.step}/{steps}, {record.images} images, loss {record.loss:.4g} "
        f"(x0 units {record.loss_x0:.4g}){speed}, {record.seconds:.0f} s"
    )


def train(
    config: TrainConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    objective: DenoisingLoss | None = None,
    hooks: Sequence[TrainingHook] = (),
    callbacks: Sequence[Callback] = (),
    callback_every: int = 0,
    progress: bool | None = None,
) -> StatsRecord | None:
    """Train (or resume) the run in ``run_dir``; returns the last stats record. ``hooks``:
    ``training.hooks.TrainingHook``s (``Trainer``); ``progress``: None: a bar on a terminal,
    else a line on stderr per log interval; True: a bar; False: neither."""
    trainer = Trainer(
        config,
        dataset,
        run_dir,
        resume=resume,
        device=device,
        objective=objective,
        hooks=hooks,
        callbacks=callbacks,
        callback_every=callback_every,
        progress=progress,
    )
    return trainer.run()
