"""``lossfloor.provenance.describe_run``: the versions, the command, the machine and the times
of a run, as the result files record them."""

from __future__ import annotations

import platform
import shlex
from datetime import UTC, datetime

import torch

from lossfloor import __version__
from lossfloor.provenance import cpu_model, describe_run


def test_describe_run_records_the_versions_the_command_the_machine_and_the_times():
    argv = ["lossfloor", "estimate", "--data", "my data.npz", "--out", "j*.json"]
    started = datetime(2026, 12, 7, 0, 10, tzinfo=UTC).timestamp()
    run = describe_run(argv, started, finished=started + 83.25)
    assert run["lossfloor"] == __version__
    assert run["torch"] == torch.__version__
    assert run["python"] == platform.python_version()
    assert shlex.split(run["command"]) == argv  # quoted: the space and the * survive
    assert run["cpu"] == cpu_model() and run["cpu"]
    assert run["threads"] == torch.get_num_threads()
    assert run["started"] == "2026-12-07T00:10:00Z"
    assert run["finished"] == "2026-12-07T00:11:23Z"
    assert run["seconds"] == 83.25
    assert ("gpu" in run) == torch.cuda.is_initialized()


def test_the_finish_defaults_to_now():
    import time

    before = time.time()
    run = describe_run(["lossfloor"], before - 1.0)
    assert 1.0 <= run["seconds"] <= time.time() - before + 1.0 + 1e-3
