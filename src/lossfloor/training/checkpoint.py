"""A training run's checkpoint: what it holds (the weights, the EMA, the optimizer, the
objective's state, the σ and ε generators' states, the statistics' sums of the log interval
under way and the other hooks' states by ``state_key``), written after a step (``save``), read
back on resume (``resume``) so that the resumed run is bitwise the uninterrupted one, and the
checkpoint of an interrupted run (``interrupted``). Files: ``training.rundir``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lossfloor.errors import Interrupted, ParameterError, UserError
from lossfloor.models import CHECKPOINT_FORMAT
from lossfloor.training.hooks import TrainingHook

if TYPE_CHECKING:
    from lossfloor.training.loop import Trainer


def resume(t: Trainer) -> None:
    """Load the run directory's latest checkpoint into the trainer ``t`` (its run must match
    ``t``'s config and data) and note on rank 0 that the run continues."""
    ckpt = t.rundir.open_resume(t.run_config, t.dataset)
    t.net.load_state_dict(ckpt["model"])
    t.ema.load_state_dict(ckpt["ema"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.objective.load_state_dict(ckpt.get("objective", {}))  # none before lossfloor 0.2
    t.g_sigma.set_state(ckpt["rng"]["sigma"])
    t.g_noise.set_state(ckpt["rng"]["noise"])
    t.step, t.seconds = int(ckpt["step"]), float(ckpt["seconds"])
    t.saved_step = t.step
    if "stats" in ckpt:  # none in older checkpoints: an empty interval
        t.stats.load_state_dict(ckpt["stats"])
    load_hook_states(t.hooks, ckpt.get("hooks", {}))
    if t.config.steps < t.step:
        raise ParameterError(
            "steps", t.config.steps, f"the run in {t.rundir.path} is already at step "
            f"{t.step}; give at least {t.step} to continue it",
        )  # fmt: skip
    if t.group.main:
        t.rundir.continue_at(t.step, t.run_config)


def load_hook_states(hooks: Sequence[TrainingHook], states: Mapping[str, Any]) -> None:
    """Give each hook its state in a checkpoint's "hooks" (one without starts as built)."""
    unclaimed = set(states) - {hook.state_key for hook in hooks}
    if unclaimed:
        raise UserError(
            f"the checkpoint holds the state of the hooks {sorted(unclaimed)}, which this run "
            "does not have; resume with the hooks the run was trained with"
        )
    for hook in hooks:
        if hook.state_key in states:
            hook.load_state_dict(states[hook.state_key])


def _hook_states(t: Trainer) -> dict[str, Any]:
    """The checkpoint's "stats" and, where any other hook has state, "hooks"."""
    with t.group.together():
        out: dict[str, Any] = {"stats": t.stats.state_dict()}
    states = {}
    for hook in t.hooks:
        with t.group.together():
            state = hook.state_dict()
        if state:
            states[hook.state_key] = state
    return {**out, "hooks": states} if states else out


def save(t: Trainer) -> None:
    """checkpoint-latest.pt (and checkpoint-<step>.pt every ``snapshot_every`` steps) of the
    state after ``t.step``, with the hooks' (the sums of the log interval so far)."""
    for name, module in (("model", t.net), ("EMA", t.ema.model)):
        if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
            raise t.rundir.diverged(t.step, f"the {name} weights became non-finite")
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "step": t.step,
        "images": t.step * t.config.batch,
        "seconds": t.seconds,
        "config": t.run_config,
        "model": t.net.state_dict(),
        "ema": t.ema.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "objective": t.objective.state_dict(),
        "rng": {"sigma": t.g_sigma.get_state(), "noise": t.g_noise.get_state()},
        **_hook_states(t),
    }
    every = t.config.snapshot_every
    with t.group.together():
        if t.group.main:
            t.rundir.save(ckpt, snapshot=bool(every) and t.step % every == 0)
    t.saved_step = t.step


def interrupted(t: Trainer) -> Interrupted:
    """Save the state after the last whole step (if any; with the hooks', the log interval so
    far) unless it was just saved, and say what was kept."""
    if t.step > 0:
        if t.saved_step != t.step:
            save(t)
        return Interrupted(
            f"saved a checkpoint at step {t.step} in {t.rundir.path}; run the same "
            "command with --resume to continue"
        )
    return Interrupted("no training step had finished; nothing was saved")
