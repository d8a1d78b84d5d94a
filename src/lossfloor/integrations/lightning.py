"""Lightning: ``GapCallback`` feeds a ``GapTracker`` from what ``training_step`` returns and logs
its values on rank zero.

    from lossfloor.integrations.lightning import GapCallback

    class Model(LightningModule):
        def training_step(self, batch, batch_idx):
            ...
            per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            return {"loss": per_sample.mean(), "per_sample_loss": per_sample, "sigma": sigma}

    trainer = Trainer(callbacks=[GapCallback(lossfloor.GapTracker("curve.json"))])

The dict may give "timesteps" instead of "sigma" (a diffusers scheduler's); the keys are
parameters. The callback's state is the tracker's (saved in Lightning's checkpoints). Works
with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``, whichever is installed
(``lightning`` first); under several processes build the tracker with ``reduce="auto"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lossfloor.errors import UserError
from lossfloor.tracker import GapTracker

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError(
            "lossfloor.integrations.lightning needs lightning or pytorch-lightning "
            "(pip install pytorch-lightning)"
        ) from None


class GapCallback(Callback):  # type: ignore[misc]
    """Feeds ``tracker`` after each training batch from ``training_step``'s returned dict
    (``loss_key``: the per-sample loss (B,) in the target's units; ``sigma_key`` or
    ``timesteps_key``) and every ``log_every`` optimiser steps logs ``tracker.log_dict(prefix)``
    to the trainer's logger on global rank zero."""

    def __init__(
        self,
        tracker: GapTracker,
        log_every: int = 50,
        *,
        loss_key: str = "per_sample_loss",
        sigma_key: str = "sigma",
        timesteps_key: str = "timesteps",
        prefix: str = "lossfloor/",
    ) -> None:
        if not (isinstance(log_every, int) and log_every >= 1):
            raise UserError(f"GapCallback: log_every must be an integer ≥ 1, not {log_every!r}")
        self.tracker, self.log_every, self.prefix = tracker, log_every, prefix
        self.keys = (loss_key, sigma_key, timesteps_key)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss_key, sigma_key, steps_key = self.keys
        if not isinstance(outputs, Mapping) or loss_key not in outputs:
            raise UserError(
                f"GapCallback: training_step must return a dict with {loss_key!r} (the "
                f"per-sample loss) and {sigma_key!r} or {steps_key!r}"
            )
        self.tracker.update(
            outputs[loss_key], sigma=outputs.get(sigma_key), timesteps=outputs.get(steps_key)
        )
        if trainer.global_step % self.log_every == 0:
            values = self.tracker.log_dict(self.prefix)  # on every rank: it may reduce
            if trainer.is_global_zero and trainer.logger is not None:
                trainer.logger.log_metrics(values, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
