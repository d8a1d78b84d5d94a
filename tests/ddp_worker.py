"""One process of tests/test_distributed.py's torchrun launch: ``lossfloor train`` scenarios in
one process group, each result (exit code, stderr) written to ``OUT/result-<rank>.json``.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT``.
Scenarios that break one rank patch that rank's objective (the test's hook; the library has
none); every scenario must end on every rank, since each runs after the one before it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import lossfloor.cli
from lossfloor.data import load_dataset
from lossfloor.distributed import launched
from lossfloor.errors import UserError
from lossfloor.training import DenoisingLoss, Losses, TrainConfig, train

TRAIN = ["train", "--data", "digits", "--model", "tiny", "--batch", "8", "--warmup", "2"]
TRAIN += ["--log-every", "1", "--checkpoint-every", "2", "--no-progress", "--device", "cpu"]


def cli(argv: list[str]) -> dict[str, object]:
    """``lossfloor`` in this process: exit code and stderr (an exception that escapes the CLI,
    as a bug's would: its type and message)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = lossfloor.cli.main(argv)
        except Exception as exc:
            rc, err = -1, io.StringIO(f"{type(exc).__name__}: {exc}")
    return {"rc": rc, "stderr": err.getvalue()}


@contextlib.contextmanager
def broken_objective(rank: int, after: int, failure: str):
    """On ``rank``, from the objective's call ``after`` + 1 on: a NaN loss, a RuntimeError or
    a SIGINT to this process."""
    original = DenoisingLoss.__call__
    calls = 0

    def patched(self, *args, **kwargs) -> Losses:
        nonlocal calls
        calls += 1
        losses = original(self, *args, **kwargs)
        if calls <= after:
            return losses
        if failure == "raise":
            raise RuntimeError("forced failure")
        if failure == "signal":  # Ctrl-C reaching rank 1 alone, during its step `after`+1
            os.kill(os.getpid(), signal.SIGINT)
            return losses
        return Losses(losses.loss * float("nan"), losses.loss_x0, losses.sigma)

    if dist.get_rank() == rank:
        DenoisingLoss.__call__ = patched
    try:
        yield
    finally:
        DenoisingLoss.__call__ = original


@contextlib.contextmanager
def recorded_parts(parts: list[list[int]]):
    """Record the rows (``part`` start, rows, batch) of every objective call on this rank."""
    original = DenoisingLoss.__call__

    def recording(self, denoiser, x0, labels, **kwargs) -> Losses:
        start, total = kwargs.get("part", (0, len(x0)))
        parts.append([start, len(x0), total])
        return original(self, denoiser, x0, labels, **kwargs)

    DenoisingLoss.__call__ = recording
    try:
        yield
    finally:
        DenoisingLoss.__call__ = original


class WholeBatchLoss(DenoisingLoss):
    """An objective that cannot draw for a part of the batch (no ``part=``)."""

    def __call__(self, denoiser, x0, labels, *, g_sigma, g_noise) -> Losses:
        return super().__call__(denoiser, x0, labels, g_sigma=g_sigma, g_noise=g_noise)


def api_error(run_dir: Path) -> str | None:
    """The UserError of ``train`` with ``WholeBatchLoss`` (None if it trained)."""
    config = TrainConfig(steps=1, batch=8, model="tiny", warmup=2)
    try:
        train(config, load_dataset("digits", limit=24), run_dir, objective=WholeBatchLoss())
    except UserError as exc:
        return str(exc)
    return None


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with launched(torch.device("cpu")) as (group, _):
        rank, results = group.rank, {}
        run, parts = str(out / "full"), []
        with recorded_parts(parts):
            results["full"] = cli([*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", run])
        results["full"]["parts"] = parts
        half = str(out / "resumed")
        results["half"] = cli([*TRAIN, "--limit", "24", "--steps", "2", "--run-dir", half])
        results["resumed"] = cli(
            [*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", half, "--resume"]
        )
        across = str(out / "across")  # left at step 2 for the test to resume in one process
        results["across"] = cli([*TRAIN, "--limit", "24", "--steps", "2", "--run-dir", across])
        with broken_objective(rank=1, after=2, failure="nan"):
            results["nan"] = cli(
                [*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", str(out / "nan")]
            )
        with broken_objective(rank=1, after=0, failure="raise"):
            results["raise"] = cli(
                [*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", str(out / "raise")]
            )
        with broken_objective(rank=1, after=1, failure="signal"):
            results["stop"] = cli(
                [*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", str(out / "stop")]
            )
        # one log interval of 4 steps: uninterrupted, and interrupted at step 2 then resumed
        interval = [*TRAIN, "--limit", "24", "--steps", "4", "--log-every", "4"]
        interval += ["--checkpoint-every", "100"]
        results["interval"] = cli([*interval, "--run-dir", str(out / "interval")])
        with broken_objective(rank=1, after=1, failure="signal"):
            results["cut"] = cli([*interval, "--run-dir", str(out / "cut")])
        results["cut-resumed"] = cli([*interval, "--run-dir", str(out / "cut"), "--resume"])
        results["batch"] = cli(
            [*TRAIN, "--limit", "24", "--steps", "2", "--batch", "7", "--run-dir", str(out / "b")]
        )
        results["objective"] = api_error(out / "objective")
        limit = "24" if rank == 0 else "23"  # another data set on rank 1
        results["data"] = cli(
            [*TRAIN, "--limit", limit, "--steps", "2", "--run-dir", str(out / "data")]
        )
        bad = out / "bad"
        if group.main:
            shutil.copytree(out / "full", bad)
            (bad / "checkpoint-latest.pt").write_bytes(b"not a checkpoint")
        group.sum(torch.zeros(1))  # a barrier: the copy exists before anyone resumes
        results["bad"] = cli(
            [*TRAIN, "--limit", "24", "--steps", "6", "--run-dir", str(bad), "--resume"]
        )
        (out / f"result-{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Results written and the process group destroyed: leave without interpreter finalization.
    # After the scenarios that break one rank, gloo's worker threads can still hold finished
    # work whose tensors are freed during finalization, which aborts the process now and then
    # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
