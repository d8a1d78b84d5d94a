"""Shared fixtures: small deterministic datasets."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_set() -> torch.Tensor:
    """40 random points in 6 dims, float64."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g, dtype=torch.float64)
