"""Named random streams: every random draw comes from a generator seeded by (seed, *keys).

Results then depend only on the user's --seed, not on chunk sizes, thread counts, devices or
the order in which work is done. The first key is a stream's purpose, one of ``Stream``: the
one table of purposes (tests/test_seeding.py checks that no two collide and that no call passes
a bare integer).
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch


class Stream(int, Enum):
    """The purpose of a random stream: the key after the seed, an int (its value unchanged
    since it was a literal, so every draw is the same). Each purpose belongs to a domain, the
    computations that may share one seed: ``estimate`` (J* and the results on it: the estimate,
    the diagnosis, the monitor, the floor) and ``training`` (a training run). Within a domain
    the ids are distinct; ids 0–3 were given in both domains before this table (training's
    model, data order, σ and ε; the estimate's sources, outer ε, inner sets and tilt uniforms)
    and stay so, to keep every number; a new purpose takes an id used in no domain."""

    # estimate: J* and the results on it
    SOURCES = 0, "estimate"  # the stratified outer sources: (seed, SOURCES)
    OUTER_NOISE = 1, "estimate"  # each outer block's ε: (seed, OUTER_NOISE, block)
    INNER = 2, "estimate"  # each block's inner random sets: (seed, INNER, block)
    TILT = 3, "estimate"  # each block's tilt component uniforms: (seed, TILT, block)
    FLOOR_SUBSETS = 10, "estimate"  # the floor's nested subsets: (seed, FLOOR_SUBSETS, repeat)
    FLOOR_VALIDATION = 11, "estimate"  # the floor's bandwidth validation ε, by block
    COMPONENT = 12, "estimate"  # each block's z of Gaussian items' x0 = m + s·z: (seed, ., block)
    # training: a run
    MODEL = 0, "training"  # the net's initial weights: torch.manual_seed((seed, MODEL))
    DATA_ORDER = 1, "training"  # each epoch's permutation: (seed, DATA_ORDER, epoch)
    SIGMA = 2, "training"  # the objective's σ: (seed, SIGMA)
    NOISE = 3, "training"  # the objective's ε: (seed, NOISE)
    UNCERTAINTY = 4, "training"  # the uncertainty net's Fourier features: (seed, UNCERTAINTY)
    LATENT = 13, "training"  # each step's z of Gaussian items' x0 = m + s·z: (seed, LATENT, step)

    def __new__(cls, key: int, domain: str) -> Stream:
        obj = int.__new__(cls, key)
        obj._value_ = (key, domain)
        return obj

    @property
    def domain(self) -> str:
        """The computations this purpose belongs to (``estimate`` or ``training``)."""
        return str(self._value_[1])

    def __repr__(self) -> str:
        return f"<Stream.{self.name}: {int(self)}, {self.domain}>"


def derived_seed(seed: int, purpose: Stream, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream (seed, purpose, *keys), through numpy's
    SeedSequence."""
    entropy = [int(seed), int(purpose), *map(int, keys)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0]) >> 1


def generator_for(seed: int, purpose: Stream, *keys: int) -> torch.Generator:
    """A CPU generator for the stream (seed, purpose, *keys)."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, *keys))
