"""Named random streams: every random draw comes from a generator seeded by (seed, *keys).

Results then depend only on the user's --seed, not on chunk sizes, thread counts, devices or
the order in which work is done.
"""

from __future__ import annotations

import numpy as np
import torch


def derived_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream (seed, *keys), through numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0]) >> 1


def generator_for(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for the stream (seed, *keys)."""
    return torch.Generator().manual_seed(derived_seed(seed, *keys))
