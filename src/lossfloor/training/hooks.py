"""Training hooks: what a training loop hands, per batch and per log step, to what follows the
training (its statistics, the gap to J*, the optimal schedule's online gap, a user's own).

A hook (``TrainingHook``) is called

  on_batch(batch)    after each optimiser step, with a ``Batch``: the σ drawn (B,) and the
                     per-sample x0-unit losses ‖D − x0‖²/d (B,) of this process's rows, and, where
                     the loop has them, the per-sample losses as minimised, the global batch's
                     mean loss, the model, the step and its time;
  on_log(log)        at a log step, with a ``LogStep`` (the step, the model to evaluate, what the
                     step logs so far); returns {key: JSON-able value} to add to the log;
  state_dict(), load_state_dict(state)
                     what it has learnt (tensors, numbers, lists, dicts: what
                     ``torch.load(weights_only=True)`` reads), checkpointed under ``state_key``, so
                     that a resumed run is bitwise the uninterrupted one;
  log_every          0: on_log at every log step of the loop; k ≥ 1: lossfloor's trainer calls it
                     every k steps (and writes a stats record then, between its own log steps).

``TrainingHook`` is a runtime-checkable ``typing.Protocol``, not a base class: a hook is any
object with these members (a class of another library included, which need not import lossfloor's
trainer), and the trainer checks them (``check_hooks``) before it starts. ``Hook`` is a base with
the defaults (nothing per batch, nothing logged, no state, the class name as key) for hooks that
need only some of them. Nothing here is lossfloor's trainer: another loop builds a ``Batch`` from
its σ and losses (``Batch(sigma, loss_x0)``), calls ``on_log`` when it logs and saves
``state_dict()`` with its checkpoint.

Several processes: each process's hook sees its own rows of every batch. A hook whose values sum
over rows takes a ``Reducer`` (``lossfloor.distributed.Group``, or any object with ``world``,
``main`` and ``sum``) when it is built and sums over it in ``on_log`` and ``state_dict``; the loop
calls every hook on every process at the same points, so these collectives line up. lossfloor's
trainer runs each hook's ``on_log`` and ``state_dict`` in its own ``Group.together()`` block (an
error on one process is raised on all), so a hook sums before anything that may fail on one
process alone; ``on_batch`` holds no collective. Where only one process needs to compute (rank 0
writes the log) ``LogStep.main`` says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from lossfloor.errors import UserError

__all__ = ["Batch", "Hook", "LogStep", "Reducer", "TrainingHook", "check_hooks"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Batch:
    """One training batch, as a hook sees it (this process's rows of it).

    sigma: the VE noise levels σ̃ drawn (B,); loss_x0: the per-sample x0-unit losses
    mean_elements (D − x0)² (B,), detached; loss: the per-sample losses as minimised (the loop's
    own units and weighting, e.g. w(σ)·loss_x0), detached; batch_loss: the mean minimised loss of
    the whole batch (over every process's rows; a scalar); model: the model being trained; step:
    the optimiser steps done, this batch's included; seconds: the step's time.
    """

    sigma: Tensor
    loss_x0: Tensor
    loss: Tensor | None = None
    batch_loss: Tensor | None = None
    model: Any = None
    step: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class LogStep:
    """A log step: ``step`` (optimiser steps done), ``model`` (what to evaluate: lossfloor's
    trainer gives the EMA denoiser, in eval mode), ``record`` (what this step logs so far, read
    only) and ``main`` (whether this process writes the log; what the others return is kept
    in their own records only)."""

    step: int
    model: Any
    record: Mapping[str, Any]
    main: bool = True


@runtime_checkable
class Reducer(Protocol):
    """The processes a hook sums over: ``world`` processes, ``main`` on the one that writes,
    ``sum(t)`` the elementwise sum of ``t`` over them (the same shape on all; may be in place)."""

    @property
    def world(self) -> int: ...

    @property
    def main(self) -> bool: ...

    def sum(self, tensor: Tensor) -> Tensor: ...


@runtime_checkable
class TrainingHook(Protocol):
    """What a training loop calls (module docstring)."""

    @property
    def state_key(self) -> str: ...

    @property
    def log_every(self) -> int: ...

    def on_batch(self, batch: Batch) -> None: ...

    def on_log(self, log: LogStep) -> Mapping[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Hook:
    """A ``TrainingHook`` that does nothing: subclass it and override what the hook needs."""

    log_every: int = 0

    @property
    def state_key(self) -> str:
        """The key of the state in a checkpoint: the class's qualified name (override it to
        give two hooks of one class with state their own keys)."""
        return type(self).__qualname__

    def on_batch(self, batch: Batch) -> None:
        """Nothing per batch."""

    def on_log(self, log: LogStep) -> Mapping[str, Any]:
        """Nothing to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """No state: refuse any."""
        if state:
            raise UserError(
                f"the hook {self.state_key} has no state, but the checkpoint holds "
                f"{sorted(state)} for it"
            )


_MEMBERS = ("state_key", "log_every", "on_batch", "on_log", "state_dict", "load_state_dict")


def check_hooks(hooks: Sequence[Any]) -> list[TrainingHook]:
    """``hooks`` as a list, each checked: a ``TrainingHook`` with log_every ≥ 0 and a
    ``state_key`` no other has (UserError naming what is wrong)."""
    keys: set[str] = set()
    for hook in hooks:
        if not isinstance(hook, TrainingHook):
            missing = [m for m in _MEMBERS if not hasattr(hook, m)]
            raise UserError(
                f"{type(hook).__name__} is not a training hook: it lacks {', '.join(missing)} "
                "(lossfloor.training.hooks.TrainingHook)"
            )
        every = hook.log_every
        if not (isinstance(every, int) and every >= 0):
            raise UserError(f"the hook {hook.state_key} has log_every = {every!r}; give an int ≥ 0")
        if hook.state_key in keys:
            raise UserError(
                f"two hooks have the state_key {hook.state_key!r}; give each its own (a hook's "
                "state is checkpointed under its key)"
            )
        keys.add(hook.state_key)
    return list(hooks)
