"""The one owner of a run directory's layout (`lossfloor.runfiles`), as training writes it and
models and the scaling collection read it."""

from __future__ import annotations

import pytest
import torch

from lossfloor.models import CHECKPOINT_FORMAT, checkpoint_path
from lossfloor.runfiles import CHECKPOINT_LATEST, snapshot_name, snapshot_step, snapshots
from lossfloor.scaling.collection import run_checkpoints
from lossfloor.training.rundir import RunDir


@pytest.mark.parametrize("step", [0, 7, 50, 12_345_678, 123_456_789])
def test_a_snapshot_name_round_trips_its_step(step):
    assert snapshot_step(snapshot_name(step)) == step


def test_snapshot_names_are_zero_padded_to_eight_digits():
    assert snapshot_name(50) == "checkpoint-00000050.pt"  # the names of existing runs


@pytest.mark.parametrize(
    "name", [CHECKPOINT_LATEST, "checkpoint-.pt", "checkpoint-12.pt.tmp", "x-checkpoint-1.pt"]
)
def test_other_files_are_not_snapshots(name):
    assert snapshot_step(name) is None


def test_models_and_scaling_find_the_checkpoints_training_wrote(tmp_path):
    run = RunDir(tmp_path)
    for step, snapshot in ((4, True), (8, True), (10, False)):
        run.save({"format": CHECKPOINT_FORMAT, "step": step}, snapshot=snapshot)
    assert sorted(snapshots(tmp_path)) == [4, 8]
    assert checkpoint_path(tmp_path) == run.latest == tmp_path / CHECKPOINT_LATEST
    assert run_checkpoints(tmp_path) == [
        (4, tmp_path / snapshot_name(4)),
        (8, tmp_path / snapshot_name(8)),
        (10, tmp_path / CHECKPOINT_LATEST),
    ]
    assert torch.load(run.latest, weights_only=True)["step"] == 10
