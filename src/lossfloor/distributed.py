"""torch.distributed for multi-process runs under torchrun: set-up, this process's place, and
agreement on errors.

Every process runs the same program, and a collective returns only when every process has called
it; a process that raises and skips a collective leaves the others waiting. So work that may fail
on one process runs inside ``Group.together()``: afterwards the processes all-reduce a failure
flag, and if any failed, every process raises — the failed one its own error, the others a
``UserError`` with the first failed process's message (a one-line error is then the same line on
every process). The process-group timeout (``LOSSFLOOR_DIST_TIMEOUT`` seconds, default 600) ends
a wait that no agreement can: a process killed or stuck.

One process (no ``WORLD_SIZE`` in the environment, or 1) needs no torch.distributed at all:
``Group()`` is rank 0 of 1 and its collectives return their input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lossfloor.errors import ParameterError, UserError

__all__ = ["TIMEOUT_ENV", "Group", "current", "launched"]

TIMEOUT_ENV = "LOSSFLOOR_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0

Tensor = torch.Tensor
T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place: ``rank`` of ``world`` processes; collective tensors live on
    ``device`` (the CPU for gloo, this process's GPU for NCCL)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes."""
        return self.rank == 0

    def part(self, total: int) -> tuple[int, int]:
        """Rows [start, stop) of this process in a batch of ``total`` split into equal parts."""
        if total % self.world:
            raise ParameterError(
                "batch", total, f"must be a multiple of the number of processes ({self.world})"
            )
        size = total // self.world
        return self.rank * size, (self.rank + 1) * size

    def shard(self, total: int) -> tuple[int, int]:
        """Rows [start, stop) of this process's contiguous shard of ``total`` rows: rank r holds
        [⌊rT/K⌋, ⌊(r+1)T/K⌋), so the shards' sizes differ by at most one."""
        return self.rank * total // self.world, (self.rank + 1) * total // self.world

    def max(self, tensor: Tensor) -> Tensor:
        """Elementwise max over processes of ``tensor`` (on ``device``), in place; returned."""
        if self.world > 1:
            dist.all_reduce(tensor, dist.ReduceOp.MAX)
        return tensor

    def cat(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """Every process's ``tensor`` (the same shape on all), concatenated along ``dim`` in rank
        order."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def sum(self, tensor: Tensor) -> Tensor:
        """Σ over processes of ``tensor`` (on ``device``), in place; returned."""
        if self.world > 1:
            dist.all_reduce(tensor, dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (one process: no tensor, no device sync)."""
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def mean_and_any(self, value: Tensor, flag: bool) -> tuple[Tensor, bool]:
        """The mean over processes of the scalar ``value`` and whether ``flag`` is true on any,
        in one all-reduce (one process: ``value`` itself)."""
        if self.world == 1:
            return value, flag
        both = self.sum(torch.stack([value.detach(), value.new_tensor(float(flag))]))
        return both[0] / self.world, bool(both[1])

    def gather(self, value: T) -> list[T]:
        """Every process's ``value`` (picklable), by rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def settle(self, error: Exception | None) -> None:
        """Raise on every process if any process has an ``error``: the failed process its own,
        the others a UserError with the first failed process's message."""
        if not self.any(error is not None):
            return
        messages = self.gather(None if error is None else _message(error, self.rank))
        if error is not None:
            raise error
        raise UserError(next(m for m in messages if m is not None))

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run the block, then ``settle`` its error (if any) across the processes."""
        if self.world == 1:
            yield
            return
        error = None
        try:
            yield
        except Exception as exc:  # every kind: the others must hear of it, not wait
            error = exc
        self.settle(error)

    def check_same(self, what: str, value: str, shown: str | None = None) -> None:
        """UserError on every process unless ``value`` (e.g. a fingerprint) is the same on all;
        the message lists each process's ``shown`` (default: the value)."""
        pairs = self.gather((value, value if shown is None else shown))
        if len({v for v, _ in pairs}) > 1:
            listed = ", ".join(f"rank {r}: {s}" for r, (_, s) in enumerate(pairs))
            raise UserError(
                f"the {self.world} processes hold different {what} ({listed}); give every "
                "process the same inputs"
            )


def _message(error: Exception, rank: int) -> str:
    """What the other processes say about ``error`` on process ``rank``."""
    if isinstance(error, UserError):
        return str(error)
    return f"process {rank} failed with {type(error).__name__}: {error} (see its output)"


def current(device: torch.device | str = "cpu") -> Group:
    """The group of torch.distributed's default process group (one process if none is set up);
    collective tensors on ``device``."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group(device=torch.device(device))
    return Group(dist.get_rank(), dist.get_world_size(), torch.device(device))


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(_DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


@contextmanager
def launched(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """The process group torchrun's environment describes (``WORLD_SIZE`` > 1), set up for the
    block and torn down after it — gloo on the CPU, NCCL on CUDA, this process on GPU
    ``LOCAL_RANK`` — and this process's device. One process, or a group set up by the caller:
    used as is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        yield current(device), device
        return
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run one process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=_timeout())
    try:
        yield current(device), device
    finally:
        dist.destroy_process_group()
