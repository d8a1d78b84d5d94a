"""DDP training (``lossfloor.distributed``, the Trainer under torchrun): 2 CPU processes (gloo)
against one, errors on one rank, and the pieces that need no process group.

One torchrun launch (tests/ddp_worker.py) runs every multi-process scenario in one process group,
so the file pays the start-up of torch and the group once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from ddp_worker import TRAIN
from tolerances import sum_rtol
from torchrun import run_workers

import lossfloor.cli
from lossfloor.backbone import UNetBackbone, backbone_config
from lossfloor.data import load_dataset
from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.distributed import TIMEOUT_ENV, Group, _timeout
from lossfloor.errors import ParameterError, UserError
from lossfloor.seeding import Stream, generator_for
from lossfloor.training import DenoisingLoss, read_stats
from lossfloor.training.config import ADAM_BETAS, TrainConfig

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
WORKER = Path(__file__).parent / "ddp_worker.py"


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The worker's scenarios under ``torchrun --nproc_per_node 2``: its folder and each
    rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    return out, run_workers(WORKER, out)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The same run as the worker's "full" in one process (this one)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", str(run_dir)]
        assert lossfloor.cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint-latest.pt", weights_only=True)


# ----- two processes against one ----------------------------------------------------------
def test_two_processes_split_the_global_batch(launch):
    _, results = launch
    for rank in (0, 1):
        assert results[rank]["full"]["rc"] == 0, results[rank]["full"]["stderr"]
        # each rank's objective saw its half of every batch of 8: rows 4r…4r+3
        assert results[rank]["full"]["parts"] == [[4 * rank, 4, 8]] * 4


@pytest.mark.numerics
def test_two_processes_train_as_one_at_the_same_global_batch(launch, single):
    out, _ = launch
    one, two = _ckpt(single), _ckpt(out / "full")
    # the global draws do not depend on the number of processes: the generators' states after
    # 4 steps are bitwise those of one process, and so are the image counts per σ bin
    assert torch.equal(one["rng"]["sigma"], two["rng"]["sigma"])
    assert torch.equal(one["rng"]["noise"], two["rng"]["noise"])
    stats1, stats2 = read_stats(single / "stats.jsonl"), read_stats(out / "full" / "stats.jsonl")
    assert [r.step for r in stats2] == [1, 2, 3, 4]
    for r1, r2 in zip(stats1, stats2, strict=True):
        assert (r1.images, r1.bin_count) == (r2.images, r2.bin_count)
        # float32 losses averaged over 2×4 rows instead of 8 (and per-rank convolutions on 4
        # rows, each output a sum of ≤ 9·32 products): the sums' rounding (sum_rtol); weights
        # that differ after a step (below) move the loss only at second order where they do,
        # their gradient being ~0 there. Measured ≤ 2e-7 relative
        rtol = sum_rtol(8 * 64, per_term_ulps=9 * 32, eps=float(torch.finfo(torch.float32).eps))
        assert r2.loss == pytest.approx(r1.loss, rel=rtol)
        assert r2.loss_x0 == pytest.approx(r1.loss_x0, rel=rtol)
        for b1, b2 in zip(r1.bin_loss_x0, r2.bin_loss_x0, strict=True):
            assert (b1 is None) == (b2 is None)
            assert b1 is None or b2 == pytest.approx(b1, rel=rtol)
    # weights after 4 AdamW steps: the gradient all-reduce (float32, 2 partial sums) differs
    # from one process's sum in the last bits, and Adam's m/√v amplifies that where a gradient
    # is near 0, up to Adam's bound on a step, lr·(1 − β1)/√(1 − β2) (Kingma & Ba §2.1), in
    # either direction; measured max |Δw| = 6.3e-6
    beta1, beta2 = ADAM_BETAS
    step_bound = TrainConfig(steps=4).lr * max(1.0, (1 - beta1) / math.sqrt(1 - beta2))
    for key in ("model", "ema"):
        for name, w in one[key].items():
            torch.testing.assert_close(two[key][name], w, rtol=0, atol=2 * 4 * step_bound)
    config = json.loads((out / "full" / "config.json").read_text())
    assert config["processes"] == 2


def test_resume_under_torchrun_is_bitwise_the_uninterrupted_run(launch):
    out, results = launch
    for rank in (0, 1):
        assert results[rank]["half"]["rc"] == results[rank]["resumed"]["rc"] == 0
    full, resumed = _ckpt(out / "full"), _ckpt(out / "resumed")
    assert resumed["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][n], w) for n, w in full[key].items())
    timing = ("seconds", "step_seconds", "images_per_s")
    stats = [
        [{k: v for k, v in r.to_json().items() if k not in timing} for r in read_stats(path)]
        for path in (out / "resumed" / "stats.jsonl", out / "full" / "stats.jsonl")
    ]
    assert stats[0] == stats[1] and [r["step"] for r in stats[0]] == [1, 2, 3, 4]


def test_a_two_process_run_resumes_in_one_process(launch, single, tmp_path):
    out, results = launch
    assert results[0]["across"]["rc"] == 0
    run_dir = tmp_path / "across"
    shutil.copytree(out / "across", run_dir)
    argv = [*TRAIN, "--limit", "24", "--steps", "4", "--run-dir", str(run_dir), "--resume"]
    assert lossfloor.cli.main(argv) == 0
    one, resumed = _ckpt(single), _ckpt(run_dir)
    assert torch.equal(one["rng"]["noise"], resumed["rng"]["noise"])
    for key in ("model", "ema"):  # the same bound as 2 processes against 1 (see above)
        for name, w in one[key].items():
            torch.testing.assert_close(resumed[key][name], w, rtol=0, atol=1e-4)
    assert json.loads((run_dir / "config.json").read_text())["processes"] == 1


# ----- a failure on one rank stops both, with the same line -------------------------------
def test_nan_loss_on_rank_1_stops_both_ranks_with_the_same_error(launch):
    out, results = launch
    errors = [results[r]["nan"] for r in (0, 1)]
    assert [e["rc"] for e in errors] == [2, 2]
    assert errors[0]["stderr"] == errors[1]["stderr"]
    line = errors[0]["stderr"]
    assert line.count("\n") == 1 and "training stopped at step 3: the loss is nan" in line
    assert _ckpt(out / "nan")["step"] == 2  # the last good checkpoint is kept


def test_an_exception_on_rank_1_stops_rank_0_with_its_message(launch):
    _, results = launch
    assert results[1]["raise"] == {"rc": -1, "stderr": "RuntimeError: forced failure"}
    assert results[0]["raise"]["rc"] == 2
    assert "process 1 failed with RuntimeError: forced failure" in results[0]["raise"]["stderr"]


def test_an_interrupt_on_rank_1_stops_both_ranks_after_the_same_step(launch):
    out, results = launch
    for rank in (0, 1):
        assert results[rank]["stop"]["rc"] == 130
        assert "saved a checkpoint at step 2" in results[rank]["stop"]["stderr"]
    assert _ckpt(out / "stop")["step"] == 2
    # as in one process, the step under way is logged (and checkpointed) before the stop
    assert [r.step for r in read_stats(out / "stop" / "stats.jsonl")] == [1, 2]


def test_a_run_interrupted_inside_a_log_interval_resumes_to_the_same_stats(launch):
    out, results = launch
    for rank in (0, 1):
        assert results[rank]["interval"]["rc"] == results[rank]["cut-resumed"]["rc"] == 0
        assert "saved a checkpoint at step 2" in results[rank]["cut"]["stderr"]
    full, resumed = (read_stats(out / d / "stats.jsonl") for d in ("interval", "cut"))
    assert [r.step for r in full] == [r.step for r in resumed] == [4]
    a, b = full[0], resumed[0]
    assert (a.images, a.bin_count, a.loss, a.lr) == (b.images, b.bin_count, b.loss, b.lr)
    # the checkpoint holds both ranks' per-bin sums of steps 1–2; the resumed rank 0 adds its
    # rows of steps 3–4 to them, so the float64 sums are added in another order: equal up to
    # float64 rounding (each add is exact to 2⁻⁵³ relative; a few adds per bin)
    assert b.loss_x0 == pytest.approx(a.loss_x0, rel=1e-14, abs=0)
    for x, y in zip(a.bin_loss_x0, b.bin_loss_x0, strict=True):
        assert (x is None and y is None) or y == pytest.approx(x, rel=1e-14, abs=0)


def test_different_data_on_the_ranks_is_refused_on_every_rank(launch):
    out, results = launch
    for rank in (0, 1):
        line = results[rank]["data"]["stderr"]
        assert results[rank]["data"]["rc"] == 2
        assert "the 2 processes hold different data (rank 0: digits" in line
    assert not (out / "data" / "checkpoint-latest.pt").exists()


def test_a_batch_that_does_not_split_and_an_unsplittable_objective_are_refused(launch):
    _, results = launch
    for rank in (0, 1):
        assert results[rank]["batch"]["rc"] == 2
        line = "--batch 7: must be a multiple of the number of processes (2)"
        assert line in results[rank]["batch"]["stderr"]
        assert "WholeBatchLoss takes no part=(start, total)" in results[rank]["objective"]


def test_a_bad_checkpoint_stops_every_rank(launch):
    _, results = launch
    for rank in (0, 1):
        assert results[rank]["bad"]["rc"] == 2
        assert "checkpoint-latest.pt is not a readable checkpoint" in results[rank]["bad"]["stderr"]


# ----- pieces without a process group -----------------------------------------------------
@pytest.mark.numerics
def test_objective_parts_draw_the_whole_batch_and_keep_their_rows():
    x0 = load_dataset("digits", limit=8).x
    denoiser = Denoiser(UNetBackbone(backbone_config((1, 8, 8), "tiny")), "edm", "F").eval()
    objective = DenoisingLoss("edm")

    def call(rows: slice, part=None):
        g_sigma, g_noise = generator_for(0, Stream.SIGMA), generator_for(0, Stream.NOISE)
        kw = {} if part is None else {"part": part}
        with torch.no_grad():
            out = objective(denoiser, x0[rows], None, g_sigma=g_sigma, g_noise=g_noise, **kw)
        return out, g_sigma.get_state(), g_noise.get_state()

    whole, s_state, n_state = call(slice(0, 8))
    for start in (0, 4):
        half, s_half, n_half = call(slice(start, start + 4), (start, 8))
        assert torch.equal(half.sigma, whole.sigma[start : start + 4])
        assert torch.equal(s_half, s_state) and torch.equal(n_half, n_state)
        # the net on 4 rows instead of 8: float32 convolutions (sums of ≤ 9·32 products) may
        # round differently, then a mean over the 64 pixels (sum_rtol)
        rtol = sum_rtol(64, per_term_ulps=9 * 32, eps=float(torch.finfo(torch.float32).eps))
        torch.testing.assert_close(half.loss, whole.loss[start : start + 4], rtol=rtol, atol=0)


def test_one_process_group_passes_errors_through_and_splits_nothing():
    group = Group()
    assert group.part(7) == (0, 7) and group.main and group.gather("x") == ["x"]
    # not turned into a UserError: one process has no one to agree with
    with pytest.raises(KeyError), group.together():
        raise KeyError("k")


def test_a_batch_must_split_evenly():
    with pytest.raises(ParameterError, match="multiple of the number of processes"):
        Group(rank=1, world=2).part(7)
    assert Group(rank=1, world=2).part(8) == (4, 8)


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_the_group_timeout_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(UserError, match=TIMEOUT_ENV):
        _timeout()
