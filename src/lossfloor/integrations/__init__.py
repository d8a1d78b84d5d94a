"""Thin adapters from ``lossfloor.GapTracker`` to the tools people train with. Each module
imports its framework only when it is imported itself, and none is a dependency of lossfloor:

  tensorboard   ``log_tensorboard(writer, tracker, step)``: scalars per bin and a gap-vs-σ image
  accelerate    ``log_accelerate(accelerator, tracker, step)``: ``accelerator.log(…)``
  lightning     ``GapCallback(tracker)``: σ and per-sample losses from ``training_step``'s dict
  edm           ``EDMGapLoss`` / ``EDM2GapLoss``: EDM's and EDM2's losses, same draws, σ reported
  files         ``append_csv`` / ``append_jsonl``: plain files, for loops with none of these
"""
