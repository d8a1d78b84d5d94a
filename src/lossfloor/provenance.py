"""Where a result came from: the software, the command, the machine and the time of a run, as
the ``provenance`` block that the CLI adds to the result files it writes (``Result.provenance``).
"""

from __future__ import annotations

import platform
import shlex
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from lossfloor import __version__


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name" (Linux), else
    ``platform.processor()``, else the machine type ("x86_64")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _iso(t: float) -> str:
    """A POSIX time as ISO 8601 UTC to the second ("2026-12-07T00:10:00Z")."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_run(
    argv: Sequence[str], started: float, finished: float | None = None
) -> dict[str, Any]:
    """The provenance of a run that began at ``started`` (``time.time()``) with the command
    ``argv``: {"lossfloor", "torch", "python": versions; "command": ``argv`` as one shell-quoted
    string; "cpu": ``cpu_model()``; "gpu": the current CUDA device's name, only when this process
    used CUDA (``torch.cuda.is_initialized()``); "threads": ``torch.get_num_threads()``;
    "started", "finished": ISO UTC; "seconds": finished − started}. ``finished``: now if None."""
    import torch

    finished = time.time() if finished is None else finished
    out: dict[str, Any] = {
        "lossfloor": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": shlex.join(argv),
        "cpu": cpu_model(),
    }
    if torch.cuda.is_initialized():
        out["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    out["threads"] = torch.get_num_threads()
    out["started"] = _iso(started)
    out["finished"] = _iso(finished)
    out["seconds"] = round(finished - started, 3)
    return out
