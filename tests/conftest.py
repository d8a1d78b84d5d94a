"""Shared fixtures: small deterministic datasets."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Tests that use the global RNG get the same numbers whatever ran before them."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one thread (small convolutions are faster without thread hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_set() -> torch.Tensor:
    """40 random points in 6 dims, float64."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g, dtype=torch.float64)
