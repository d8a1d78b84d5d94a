"""Launching a test worker script under torchrun: 2 gloo CPU processes with bounded waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lossfloor
from lossfloor.distributed import TIMEOUT_ENV

# No scenario may wait on another rank for longer than this: a hang fails the test, not CI.
GROUP_TIMEOUT_S, LAUNCH_TIMEOUT_S = 60, 300


def run_workers(worker: Path, out: Path, nproc: int = 2) -> list[dict]:
    """``torchrun --standalone --nproc_per_node nproc WORKER OUT`` (one thread per process,
    the process group's timeout GROUP_TIMEOUT_S, the launch's LAUNCH_TIMEOUT_S); each rank's
    ``OUT/result-{rank}.json``."""
    src = str(Path(lossfloor.__file__).parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        TIMEOUT_ENV: str(GROUP_TIMEOUT_S),
        "PYTHONPATH": os.pathsep.join([src, str(worker.parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    proc = subprocess.run(
        [*cmd, str(nproc), str(worker), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(nproc)]
