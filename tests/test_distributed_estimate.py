"""Sharded estimation (``optimal/shard.py``): 2 CPU processes (gloo) each holding half of the data
against one process, resume and errors under torchrun, and the softmax-state merge alone.

One torchrun launch (tests/shard_worker.py) runs every multi-process scenario in one process
group, so the file pays the start-up of torch and the group once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_worker import (
    GAUSSIAN,
    GAUSSIAN_SCENARIOS,
    GRAM,
    GRAM_SCENARIOS,
    SCENARIOS,
    STATS_ROWS,
    estimate,
    redo_case,
)
from tolerances import EPS64, assert_same_point, pool_of, rounding_bound
from torchrun import run_workers

import lossfloor.cli
from lossfloor.data import chunked, fingerprint, load_dataset
from lossfloor.distributed import Group
from lossfloor.optimal.kernel import SoftmaxState, accumulate_softmax, rescaled
from lossfloor.optimal.mixture import MixturePool
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.shard import ShardedMixturePool, ShardedPool

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics, pytest.mark.slow]
WORKER = Path(__file__).parent / "shard_worker.py"
#: The per-σ numbers of a curve (not its timings).
NUMBERS = ("optimal_loss", "stderr", "closed", "closed_stderr", "direct", "direct_stderr")
NUMBERS += ("combined_weight_closed", "ess", "optimal_loss_target")


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The worker's scenarios under ``torchrun --nproc_per_node 2``: its folder and each
    rank's results."""
    out = tmp_path_factory.mktemp("shard")
    # points in general position: no two distances from a source are equal, so the neighbour
    # index of the tilted draws does not depend on the distances' last bits (see test below)
    g = torch.Generator().manual_seed(3)
    np.save(out / "points.npy", (0.5 * torch.randn(300, 64, generator=g)).numpy())
    # Gaussian items: 61 means (an odd count: shards of 30 and 31), stds from 0.02 to 0.5
    mean = 0.5 * torch.randn(61, 16, generator=g)
    std = 0.02 + 0.48 * torch.rand(61, 16, generator=g)
    np.savez(out / "gauss.npz", mean=mean.numpy(), std=std.numpy())
    return out, run_workers(WORKER, out)


def _points(path: Path) -> tuple[dict, list[dict]]:
    """(the curve's options but its provenance, its points without timings)."""
    curve = json.loads(path.read_text())
    keys = ("sigma", "dtype", "resolved", "outer", *NUMBERS)
    points = [{k: p.get(k) for k in keys} for p in curve["points"]]
    options = {k: v for k, v in curve.items() if k not in ("points", "provenance")}
    return options, points


def _assert_same_numbers(two: Path, one: Path, points: Path) -> None:
    (opt2, pts2), (opt1, pts1) = _points(two), _points(one)
    assert opt2 == opt1  # estimator, draws, form, dataset, data variance, ...
    for p2, p1 in zip(pts2, pts1, strict=True):
        assert (p2["sigma"], p2["dtype"], p2["resolved"], p2["outer"]) == (
            p1["sigma"],
            p1["dtype"],
            p1["resolved"],
            p1["outer"],
        )
        # each process sums its half of the keys and the halves are merged, one process sums
        # them in one stream: the values differ by rounding, within the bound of both runs
        draws = opt1["estimator"].get("draws")
        tol = rounding_bound(pool_of(points, p1["dtype"]), p1["sigma"], draws)
        assert_same_point(p2, p1, tol, p1["outer"] or opt1["estimator"]["outer"])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_shards_give_the_numbers_of_one_process(launch, scenario, tmp_path, monkeypatch):
    out, results = launch
    monkeypatch.setattr(chunked, "STATS_ROWS", STATS_ROWS)  # as the worker streams
    for rank in (0, 1):
        assert results[rank][scenario]["rc"] == 0, results[rank][scenario]["stderr"]
    one = tmp_path / "one.json"
    argv = [*estimate(out / "points.npy"), "--quiet", *SCENARIOS[scenario], "--out", str(one)]
    assert lossfloor.cli.main(argv) == 0
    _assert_same_numbers(out / f"{scenario}.json", one, out / "points.npy")
    assert not (out / f"{scenario}.json.partial").exists()  # rank 0 removed its checkpoint


def test_a_sharded_estimate_resumes_from_its_checkpoint(launch):
    out, results = launch
    for rank in (0, 1):
        assert results[rank]["first"]["rc"] == results[rank]["resumed"]["rc"] == 0
        assert results[rank]["resumed"]["partial_left"] is False
    # only rank 0 speaks: it says which σ it resumed; its σ = 0.5 is the saved point
    assert "resuming: 1 of 2 σ already computed" in results[0]["resumed"]["stderr"]
    assert "resuming" not in results[1]["resumed"]["stderr"]
    _, resumed = _points(out / "resumed.json")
    _, whole = _points(out / "tilted.json")
    assert resumed == whole  # the same draws on the same 2 processes: bitwise


def test_a_two_process_checkpoint_resumes_in_one_process(launch, tmp_path):
    out, results = launch
    assert results[0]["across"]["rc"] == 0
    partial = tmp_path / "across.json.partial"
    partial.write_bytes((out / "across.json.partial").read_bytes())
    saved = list(json.loads(partial.read_text())["done"].values())
    argv = [*estimate(out / "points.npy"), "--quiet", "--out", str(tmp_path / "across.json")]
    assert lossfloor.cli.main(argv) == 0
    assert not partial.exists()
    # the saved point is taken as is (its timing too), not recomputed
    assert json.loads((tmp_path / "across.json").read_text())["points"][0] == saved[0]
    # σ = 0.5 as the 2 processes saved it, σ = 2 computed here: the curve of 2 processes
    _assert_same_numbers(tmp_path / "across.json", out / "tilted.json", out / "points.npy")


def test_different_data_on_the_ranks_is_refused_on_every_rank(launch):
    _, results = launch
    errors = [results[r]["data"] for r in (0, 1)]
    assert [e["rc"] for e in errors] == [2, 2]
    assert errors[0]["stderr"] == errors[1]["stderr"]
    assert errors[0]["stderr"].count("\n") == 1
    assert "the 2 processes hold different data (rank 0: sha256" in errors[0]["stderr"]


def _mixture_tolerance(items: Path, sigma: float) -> float:
    """How far a per-σ value (per element) of two float64 estimates of the same draws of the
    Gaussian items in ``items`` that sum in other orders can differ: twice one run's bound.
    A logit errs by ≤ δ (``MixturePool.logit_error``), so a weight by a relative ~δ; the
    components' E[x0 | x, i] = σ²m_i/v_i + (s_i²/v_i)x lie within 2R + ‖x‖ of each other
    (R = max‖m − x̄‖, s²/v ≤ 1), so μ moves by e ≤ 4δ(2R + Q) + 2u·Q, Q a bound on ‖x‖ =
    ‖m + s z + σε‖ ≤ R + (max s + σ)(√D + 6) (‖z‖, ‖ε‖ ≤ √D + 6 but with probability
    ~e^-18); ‖μ‖ and ‖x0 − μ‖ ≤ 2Q, so each form moves by ≤ (4Q·e + e²)/D, and A (a float64
    sum of N terms in another order) by N·ε·A/D."""
    with np.load(items) as f:
        m, s = (torch.from_numpy(f[k]).double() for k in ("mean", "std"))
    pool = MixturePool.from_items(m, s, torch.float64, "cpu")
    d, r = pool.dim, math.sqrt(pool.max_sq)
    q = r + (float(s.max()) + sigma) * (math.sqrt(d) + 6)
    e = 4 * pool.logit_error(sigma, torch.float64) * (2 * r + q) + EPS64 * q
    return 2 * ((4 * q * e + e * e) / d + pool.n * EPS64 * pool.a / d)


@pytest.mark.parametrize("scenario", list(GAUSSIAN_SCENARIOS))
def test_two_shards_of_gaussian_items_give_the_numbers_of_one_process(launch, scenario, tmp_path):
    """The mixture's full estimate with each process holding its half of the items (its keys,
    its softmax states merged, the draws' m and s across the processes) against one process:
    the same draws, so the same numbers to rounding (``_mixture_tolerance``)."""
    out, results = launch
    for rank in (0, 1):
        assert results[rank][scenario]["rc"] == 0, results[rank][scenario]["stderr"]
    one = tmp_path / "one.json"
    argv = [a.format(out=out) for a in GAUSSIAN]
    assert (
        lossfloor.cli.main([*argv, "--quiet", *GAUSSIAN_SCENARIOS[scenario], "--out", str(one)])
        == 0
    )
    (opt2, pts2), (opt1, pts1) = _points(out / f"{scenario}.json"), _points(one)
    assert opt2 == opt1 and opt1["dataset"]["gaussian_items"] is True
    assert opt1["estimator"]["draws"] == "plain"
    for p2, p1 in zip(pts2, pts1, strict=True):
        assert (p2["sigma"], p2["dtype"]) == (p1["sigma"], p1["dtype"])
        tol = _mixture_tolerance(out / "gauss.npz", p1["sigma"])
        assert tol < 1e-4 * p1["optimal_loss"]  # tight enough to mean something
        assert_same_point(p2, p1, tol, opt1["estimator"]["outer"])


@pytest.mark.parametrize("scenario", list(GRAM_SCENARIOS))
def test_gram_on_two_processes_gives_the_numbers_of_one_process_in_memory(
    launch, scenario, tmp_path
):
    """gram (the σ grid in one sweep: plain draws) on 2 processes, in memory and streamed,
    against one in-memory process. The draws of the rest are one process's up to the rounding of the
    cumulative weights at a column's edge (``gram._shard_split``): in float64 ~N·1e-16 per
    draw (1,797 × 32 draws per σ: none expected), so every number agrees to rounding (1e-9
    relative: the float64 sums of ~1e4 terms, added in another order, differ by ~1e-12); in
    float32 ~N·1e-7 per draw, a few of the ~57,000 draws per σ take a neighbouring column —
    another draw from the same weights — which moves J* by far less than its standard error."""
    out, results = launch
    for rank in (0, 1):
        assert results[rank][scenario]["rc"] == 0, results[rank][scenario]["stderr"]
    one = tmp_path / "one.json"
    dtype = [o for o in GRAM_SCENARIOS[scenario] if o.startswith("float")]
    argv = [*GRAM, "--quiet", "--dtype", *dtype, "--out", str(one)]
    assert lossfloor.cli.main(argv) == 0
    (opt2, pts2), (opt1, pts1) = _points(out / f"{scenario}.json"), _points(one)
    assert opt2["estimator"] == opt1["estimator"]
    assert opt2["estimator"]["name"] == "gram" and opt2["estimator"]["outer"] == 1797
    for p2, p1 in zip(pts2, pts1, strict=True):
        assert (p2["sigma"], p2["dtype"]) == (p1["sigma"], p1["dtype"])
        for key, se in [("optimal_loss", "stderr"), ("closed", "closed_stderr"),
                        ("direct", "direct_stderr")]:  # fmt: skip
            if dtype == ["float64"]:
                assert p2[key] == pytest.approx(p1[key], rel=1e-9, abs=1e-15), (key, p1, p2)
                assert p2[se] == pytest.approx(p1[se], rel=1e-9, abs=1e-15), (se, p1, p2)
            else:
                assert abs(p2[key] - p1[key]) <= p1[se], (key, p1, p2)


def test_gram_s_redone_rows_and_posterior_mean_on_two_processes_are_one_process_s(launch):
    """A row whose other points are ~e^450 more probable than the source is redone relative
    to its largest logit, the max over both processes (the source on rank 0, the two points on
    rank 1); its draws and μ̂'s cross the processes: every value is one process's (float64,
    the same draws: to rounding), and the same on both ranks."""
    from lossfloor.optimal.gram import Gram

    _, results = launch
    assert results[0]["gram-pieces"] == results[1]["gram-pieces"]
    points, sources, noise, sigma = redo_case()
    pool = Pool.from_data(points, torch.float64, "cpu")
    est = Gram(inner=64)
    one = est(pool, sources, noise, sigma, torch.Generator().manual_seed(1))
    q = pool.rows(sources)[0] + sigma * noise
    mu = est.posterior_mean(pool, q, sources, sigma, torch.Generator().manual_seed(2))
    two = results[0]["gram-pieces"]
    assert 8.9 < 4 * float(one.direct[0]) < 9.1  # row 0 redone: μ near point 1, not midway
    for got, want in [(two["closed"], one.closed), (two["direct"], one.direct), (two["mu"], mu)]:
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-12,
                                   atol=1e-12)  # fmt: skip


def test_each_streaming_process_reads_only_its_shard(launch):
    """Reads of rows: the first statistics block (every process compares it), the statistics
    blocks (5 of 64 rows: rank 0 sums the first 2, rank 1 the last 3; rank 0 reads all 5 in the
    first pass, to hash them in order) and its shard of the kernel's keys (150 rows each); reads
    by index (sources, tilted neighbours): its shard."""
    _, results = launch
    for rank, (blocks, shard) in enumerate([((0, 128), (0, 150)), ((128, 300), (150, 300))]):
        reads, takes = results[rank]["reads"]["reads"], results[rank]["reads"]["takes"]
        assert reads[0] == [0, STATS_ROWS]
        first = 5 if rank == 0 else 3  # the first pass: every block on rank 0, its own on 1
        passes = 1 + first + (2 + rank)
        stats, kernel = reads[1:passes], reads[passes:]
        if rank == 0:
            everything = [[lo, min(lo + STATS_ROWS, 300)] for lo in range(0, 300, STATS_ROWS)]
            assert stats[:first] == everything
            stats = stats[first:]
        assert all(blocks[0] <= lo < hi <= blocks[1] for lo, hi in stats), stats
        assert all(shard[0] <= lo < hi <= shard[1] for lo, hi in kernel), kernel
        assert sum(hi - lo for lo, hi in kernel) == 2 * 150  # the index, then the σ
        assert takes and all(shard[0] <= lo <= hi < shard[1] for lo, hi in takes), takes


def test_two_streaming_processes_give_the_fingerprints_in_memory(launch):
    """Split over 2 processes, the statistics pass gives the sha256 of the items in memory and
    the draws' fingerprint of the in-memory tensor; the streamed curves carry that sha256."""
    out, results = launch
    ds = load_dataset(str(out / "points.npy"))
    tensor = fingerprint(ds.x.numpy(), "tensor")  # what OuterPlan.fingerprint hashes in memory
    assert results[0]["fingerprints"] == results[1]["fingerprints"] == [ds.sha256, tensor]
    for scenario in ("stream", "stream-plain", "stream-cdol"):
        assert json.loads((out / f"{scenario}.json").read_text())["dataset"]["sha256"] == ds.sha256


# ----- pieces without a process group -----------------------------------------------------
def test_rescaled_states_of_disjoint_shards_merge_to_the_whole_softmax():
    """Three shards of keys whose logits lie ~1e3 apart (one near the queries, one far, one
    empty) merge, as ``ShardedPool.merge`` does, to one stream over all keys."""
    g = torch.Generator().manual_seed(0)
    d, sigma = 5, 0.1
    queries = torch.randn(7, d, generator=g, dtype=torch.float64)
    near = queries[:4] + 0.05 * torch.randn(4, d, generator=g, dtype=torch.float64)
    far = 3.0 + torch.randn(30, d, generator=g, dtype=torch.float64)
    shards = [near, far, far[:0]]
    whole = accumulate_softmax(queries, torch.cat(shards), sigma)
    states = [accumulate_softmax(queries, keys, sigma) for keys in shards]
    m = torch.stack([s.m for s in states]).amax(dim=0)
    assert bool(((m - states[1].m) > 100).any())  # the shards' maxima differ widely
    parts = [rescaled(s, m) for s in states]
    merged = SoftmaxState(m=m, z=sum(p.z for p in parts), acc=sum(p.acc for p in parts))
    # float64 throughout: different summation orders agree to a few ulps of the sums
    torch.testing.assert_close(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
    log_z = merged.m + merged.z.log()
    torch.testing.assert_close(log_z, whole.m + whole.z.log(), rtol=1e-12, atol=0)
    empty = rescaled(states[2], torch.full_like(m, -math.inf))  # no key anywhere: stays empty
    assert bool((empty.z == 0).all()) and not bool(empty.acc.isnan().any())


def test_a_pool_of_one_shard_is_the_whole_pool():
    x = torch.randn(11, 3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = Pool.from_data(x, torch.float64, "cpu")
    shard = ShardedPool.from_shard(x, torch.float64, "cpu", Group())
    assert (shard.n, shard.shards, shard.first) == (11, 1, 0)
    torch.testing.assert_close(shard.x, whole.x, rtol=0, atol=1e-15)
    assert shard.a == pytest.approx(whole.a, rel=1e-15)
    assert shard.max_sq == pytest.approx(whole.max_sq, rel=1e-15)
    idx = torch.tensor([3, 0, 10])
    rows, sq = shard.rows(idx)
    assert torch.equal(rows, shard.x[idx]) and torch.equal(sq, shard.sq[idx])


def test_a_mixture_pool_of_one_shard_is_the_whole_mixture_pool():
    g = torch.Generator().manual_seed(4)
    m, s = torch.randn(9, 5, generator=g), 0.1 + torch.rand(9, 5, generator=g)
    whole = MixturePool.from_items(m, s, torch.float64, "cpu")
    shard = ShardedMixturePool.from_items_shard(m, s, torch.float64, "cpu", Group())
    assert (shard.n, shard.shards, shard.gaussian) == (9, 1, True)
    for name in ("x", "means", "var", "var_lo", "var_hi"):
        assert torch.equal(getattr(shard, name), getattr(whole, name)), name
    assert shard.a == pytest.approx(whole.a, rel=1e-15)
    idx, z = torch.tensor([8, 0, 3]), torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.equal(shard.draw(idx, z), whole.draw(idx, z))
    q = whole.draw(idx, z) + 0.3 * z.flip(0)
    for keys in ("logits", "values"):
        assert torch.equal(getattr(shard.keys_at(0.3), keys), getattr(whole.keys_at(0.3), keys))
    mu = [p.posterior(p.merge(p.accumulate(q, 0.3)), q) for p in (shard, whole)]
    assert torch.equal(mu[0], mu[1])
