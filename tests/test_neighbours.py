"""The neighbour index: exact k-NN of the outer sources by the kernel's GEMM, cached on disk
keyed by the data and the draws; a stale or corrupt file is rebuilt, never trusted."""

from __future__ import annotations

import pytest
import torch

import lossfloor.optimal.neighbours as nb
from lossfloor.optimal.cache import canonical
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.pool_cache import make_pools
from lossfloor.optimal.pools import Pool


def brute_force(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    d2 = torch.cdist(x[rows], x).pow(2)
    d2[torch.arange(rows.numel()), rows] = torch.inf
    return torch.cat([rows[:, None], d2.argsort(dim=1)[:, :k]], dim=1)


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """An empty $LOSSFLOOR_CACHE; returns the list of rows each index computation ranked."""
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nb, "CACHE_MIN_WORK", 0)
    seen = []
    real = nb.nearest_neighbours

    def counted(pool, rows, k, tile_bytes=nb.DEFAULT_TILE_BYTES):
        seen.append(rows.numel())
        return real(pool, rows, k, tile_bytes)

    monkeypatch.setattr(nb, "nearest_neighbours", counted)
    return seen


def data(seed: int = 3, n: int = 300, d: int = 7) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.numerics
@pytest.mark.parametrize("tile_bytes", [64 * 300 * 8, 2**25])  # 64-key tiles, one tile
def test_equals_brute_force_on_a_tiny_set(tile_bytes):
    x = data()
    pool = Pool.from_data(x, torch.float64, "cpu")
    rows = torch.tensor([0, 5, 17, 299, 150])
    got = nb.nearest_neighbours(pool, rows, 9, tile_bytes)
    assert torch.equal(got, brute_force(pool.x, rows, 9))


def test_with_many_equal_distances_a_narrower_table_is_a_prefix_of_a_wider_one():
    """Integer points: many exact ties (equal up to the expanded form's rounding). The first k
    columns of the 30-wide table are the k-wide table (so draws that read k columns are the
    same whatever other estimator widened the index), and the distances are the k smallest."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (200, 4), generator=g).double()
    pool = Pool.from_data(x, torch.float64, "cpu")
    rows = torch.arange(200)
    wide = nb.nearest_neighbours(pool, rows, 30)
    for k in (5, 12):
        assert torch.equal(nb.nearest_neighbours(pool, rows, k), wide[:, : k + 1])
    d2 = torch.cdist(pool.x, pool.x).pow(2)
    d2.fill_diagonal_(torch.inf)
    got = d2.gather(1, wide[:, 1:])
    torch.testing.assert_close(got, d2.sort(dim=1).values[:, :30], rtol=0, atol=1e-9)


def test_only_the_sources_are_ranked_and_the_rest_is_minus_one(calls):
    x = data()
    plan = OuterPlan.build(x, None, 50, 0, False)
    (table,) = nb.neighbour_tables(plan, make_pools(plan, torch.float64, "cpu"), 4)
    src = torch.unique(plan.sources)
    assert calls == [src.numel()]
    assert torch.equal(table[src], brute_force(x - x.mean(0), src, 4))
    others = torch.ones(300, dtype=torch.bool)
    others[src] = False
    assert bool((table[others] == -1).all())


def test_cached_and_invalidated_by_a_changed_dataset_or_draw_plan(calls):
    x = data()

    def index(x, m=400, seed=0, k=4):
        plan = OuterPlan.build(x, None, m, seed, False)
        return nb.neighbour_tables(plan, make_pools(plan, torch.float32, "cpu"), k)

    first = index(x)
    assert len(calls) == 1
    assert torch.equal(index(x)[0], first[0]) and len(calls) == 1  # read back
    changed = x.clone()
    changed[7, 2] += 1e-3
    index(changed)
    index(x, seed=1)
    index(x, m=500)
    index(x, k=5)
    assert len(calls) == 5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "swap_rows"])
def test_a_corrupt_file_is_rebuilt(calls, damage):
    import numpy as np

    x = data()
    plan = OuterPlan.build(x, None, 400, 0, False)
    pools = make_pools(plan, torch.float32, "cpu")
    (good,) = nb.neighbour_tables(plan, pools, 4)
    path = nb.cache_path(nb.index_key(plan, 4, torch.float32), "neighbours")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not an npz")
    else:  # a well-formed file whose rows do not start with their own index
        bad = good.numpy().copy()
        bad[[0, 1]] = bad[[1, 0]]
        np.savez(path, key=np.array(canonical(nb.index_key(plan, 4, torch.float32))),
                 group0=bad)  # fmt: skip
    (again,) = nb.neighbour_tables(plan, pools, 4)
    assert len(calls) == 2
    assert torch.equal(again, good)


def test_small_indexes_are_not_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    plan = OuterPlan.build(data(), None, 400, 0, False)
    nb.neighbour_tables(plan, make_pools(plan, torch.float32, "cpu"), 4)  # 400·300·7 < 2^30
    assert not (tmp_path / "cache").exists()


def test_conditional_indexes_each_class_within_itself(calls):
    x = data()
    labels = torch.arange(300) % 3
    plan = OuterPlan.build(x, labels, 300, 0, True)
    tables = nb.neighbour_tables(plan, make_pools(plan, torch.float64, "cpu"), 3)
    for (members, _), table in zip(plan.groups, tables, strict=True):
        xc = x[members] - x[members].mean(0)
        rows = torch.arange(members.numel())
        assert torch.equal(table, brute_force(xc, rows, 3))


def test_the_default_estimate_builds_its_index_in_float32(monkeypatch):
    """The distances ‖x_i − x_j‖² hold no σ: under the auto policy the index is float32 unless
    the data's norms need float64 (it was float64 whenever the huge-σ rule saw σ = ∞)."""
    import lossfloor.optimal.estimate as estimate_module
    from lossfloor.data import load_dataset
    from lossfloor.optimal import Full, estimate_curve

    seen = []
    real = estimate_module.neighbour_tables

    def spy(plan, pools, k, tile_bytes):
        seen.append(pools[0].x.dtype)
        return real(plan, pools, k, tile_bytes)

    monkeypatch.setattr(estimate_module, "neighbour_tables", spy)
    x = load_dataset("digits", limit=100).x
    estimate_curve(x, [0.1, 1.0], Full(), outer=100, progress=False)
    estimate_curve(x * 1e16, [1e16], Full(), outer=100, progress=False)
    assert seen == [torch.float32, torch.float64]
