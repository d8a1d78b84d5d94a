"""🤗 accelerate: the tracker's values through ``accelerator.log`` (TensorBoard, W&B, … as the
Accelerator was set up with ``log_with``).

    from lossfloor.integrations.accelerate import log_accelerate

    tracker = lossfloor.GapTracker("curve.json", scheduler=noise_scheduler, reduce="auto")
    ...
    tracker.update(per_sample_loss, timesteps=timesteps)
    if global_step % 100 == 0:
        log_accelerate(accelerator, tracker, global_step)

Under several processes build the tracker with ``reduce="auto"`` (accelerate has set up
torch.distributed): every process calls ``log_accelerate`` (the bins are summed over them) and
``accelerator.log`` writes on the main process only.
"""

from __future__ import annotations

from typing import Any

from lossfloor.tracker import GapTracker


def log_accelerate(
    accelerator: Any, tracker: GapTracker, step: int, prefix: str = "lossfloor/"
) -> dict[str, float]:
    """``accelerator.log(tracker.log_dict(prefix), step=step)``; returns the values."""
    values = tracker.log_dict(prefix)
    accelerator.log(values, step=step)
    return values
