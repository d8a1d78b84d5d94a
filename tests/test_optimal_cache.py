"""The on-disk cache of J*'s per-sample values: diagnosing again on the same draws computes J*
once; files that are corrupt or belong to other draws are recomputed, never trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lossfloor.data import load_dataset
from lossfloor.diagnosis import diagnose
from lossfloor.optimal import Full

SIGMAS = [0.3, 1.0, 3.0]


@pytest.fixture(scope="module")
def digits300():
    return load_dataset("digits", limit=300)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty $LOSSFLOOR_CACHE; returns the folder of the J* files."""
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "optimal"


@pytest.fixture
def kernel_calls(monkeypatch):
    """The σ of every call of the exact posterior mean (the kernel behind J*)."""
    calls = []
    real = Full.posterior_mean

    def counted(self, pool, queries, sources, sigma, *a, **k):
        calls.append(sigma)
        return real(self, pool, queries, sources, sigma, *a, **k)

    monkeypatch.setattr(Full, "posterior_mean", counted)
    return calls


def shrink(x, sigma, labels=None):
    """A stand-in for a checkpoint: D(x) = x/(1 + σ²) (no kernel involved)."""
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def blur(x, sigma, labels=None):
    """Another checkpoint of the same run."""
    return 0.5 * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def optimal_columns(result):
    return [(p.optimal_loss, p.optimal_loss_stderr) for p in result.points]


def numbers(result):
    rec = result.to_json()
    return [{k: v for k, v in p.items() if k != "seconds"} for p in rec["points"]]


@pytest.mark.slow
def test_a_second_diagnosis_on_the_same_draws_does_not_run_the_kernel(
    cache, monkeypatch, digits300
):
    first = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False)
    assert len(list(cache.glob("*.npz"))) == len(SIGMAS)

    def fail(*a, **k):
        raise AssertionError("J* recomputed although it is cached")

    monkeypatch.setattr(Full, "posterior_mean", fail)
    again = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False)
    assert numbers(again) == numbers(first)
    other = diagnose(blur, digits300, SIGMAS, outer=300, progress=False)  # another checkpoint
    assert optimal_columns(other) == optimal_columns(first)
    assert [p.model_loss for p in other.points] != [p.model_loss for p in first.points]


@pytest.mark.slow
def test_cached_values_equal_recomputed_ones_bit_for_bit(cache, digits300, kernel_calls):
    cached_run = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False)
    hit = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False)
    assert len(kernel_calls) > 0
    n_first = len(kernel_calls)
    fresh = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False, cache=False)
    assert len(kernel_calls) == 2 * n_first  # the hit ran no kernel; cache=False ran it all
    assert numbers(hit) == numbers(cached_run) == numbers(fresh)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [dict(seed=1), dict(outer=200), dict(conditional=True)],
    ids=["seed", "outer", "conditional"],
)
def test_other_draws_are_other_entries(cache, digits300, kernel_calls, change):
    diagnose(shrink, digits300, [1.0], outer=300, progress=False)
    before = len(kernel_calls)
    diagnose(shrink, digits300, [1.0], **{"outer": 300, **change}, progress=False)
    assert len(kernel_calls) > before
    assert len(list(cache.glob("*.npz"))) == 2


@pytest.mark.slow
def test_other_data_of_the_same_shape_is_another_entry(cache, digits300, kernel_calls):
    diagnose(shrink, digits300, [1.0], outer=300, progress=False)
    before = len(kernel_calls)
    other = load_dataset("digits", limit=301)
    diagnose(shrink, other, [1.0], outer=300, progress=False)
    assert len(kernel_calls) > before


@pytest.mark.slow
@pytest.mark.parametrize(
    "spoil",
    [
        lambda path, other: path.write_bytes(path.read_bytes()[:100]),  # truncated
        lambda path, other: path.write_bytes(b"not an npz at all"),
        lambda path, other: path.write_bytes(other.read_bytes()),  # another σ's file
        lambda path, other: np.savez(path, key=np.array("{}"), closed=[1.0], direct=[1.0]),
    ],
    ids=["truncated", "garbage", "other-key", "wrong-shape"],
)
def test_a_corrupt_or_mismatching_file_is_rebuilt(cache, digits300, kernel_calls, spoil):
    first = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False)
    files = {}
    for f in cache.glob("*.npz"):
        with np.load(f) as z:
            files[json.loads(str(z["key"]))["sigma"]] = f
    assert sorted(files) == SIGMAS
    spoil(files[1.0], files[3.0])
    calls_before = len(kernel_calls)
    again = diagnose(shrink, digits300, SIGMAS, outer=300, progress=False)
    assert numbers(again) == numbers(first)
    assert set(kernel_calls[calls_before:]) == {1.0}  # only the spoiled σ was recomputed
    with np.load(files[1.0]) as z:  # and written back whole
        assert json.loads(str(z["key"]))["sigma"] == 1.0
        assert z["direct"].shape == (300,)


def test_no_cache_writes_nothing(cache, digits300):
    diagnose(shrink, digits300, [1.0], outer=300, progress=False, cache=False)
    assert not cache.exists()
