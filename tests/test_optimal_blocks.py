"""The one loop over blocks of outer draws (``blocks.outer_blocks``)."""

import torch

from lossfloor.optimal.blocks import outer_blocks
from lossfloor.optimal.draws import OUTER_BLOCK, block_noise
from lossfloor.seeding import Stream, generator_for


def test_blocks_cover_the_sources_in_order_with_the_noise_of_their_index():
    sources = torch.arange(2 * OUTER_BLOCK + 5) % 7  # three blocks, the last of 5 draws
    blocks = list(outer_blocks(sources, seed=3, dim=4))
    b = OUTER_BLOCK
    assert [(k.index, k.lo, k.hi) for k in blocks] == [
        (0, 0, b),
        (1, b, 2 * b),
        (2, 2 * b, 2 * b + 5),
    ]
    assert torch.equal(torch.cat([b.sources for b in blocks]), sources)
    for b in blocks:  # ε of block j: N(0, I) from the generator (seed, OUTER_NOISE, j) alone
        g = generator_for(3, Stream.OUTER_NOISE, b.index)
        assert torch.equal(b.noise, torch.randn(b.hi - b.lo, 4, generator=g, dtype=torch.float64))


def test_a_later_first_block_and_another_stream_give_the_same_blocks_and_their_own_noise():
    sources = torch.arange(3 * OUTER_BLOCK)
    tail = list(outer_blocks(sources, seed=1, dim=2, first=1))
    assert [b.index for b in tail] == [1, 2]
    assert torch.equal(tail[0].noise, block_noise(1, 1, OUTER_BLOCK, 2))
    other = next(outer_blocks(sources, seed=1, dim=2, stream=Stream.FLOOR_VALIDATION))
    assert not torch.equal(other.noise, block_noise(1, 0, OUTER_BLOCK, 2))
    assert torch.equal(other.noise, block_noise(1, 0, OUTER_BLOCK, 2, Stream.FLOOR_VALIDATION))
