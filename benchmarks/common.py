"""Shared bits of the benchmarks: machine description and result files."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date

import torch


def machine() -> dict:
    """Where and when a benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "date": date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0],
    }


def import_torch_seconds() -> float:
    """Wall seconds of ``python -c "import torch"`` in a fresh process: the start-up every
    command pays, stated beside each timing (machines of one kind differ)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Minimum wall time of ``repeat`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_times(
    a: Callable[[], object], b: Callable[[], object], repeat: int = 5
) -> tuple[float, float]:
    """Minimum wall times of ``a`` and ``b`` run alternately (a, b, a, b, …), after a warm-up,
    so that load from elsewhere falls on both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)
