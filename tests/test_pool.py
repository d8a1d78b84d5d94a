"""Pool.from_data and make_pools: centring in place and reading the data without a gathered
copy give the same bits as the plain formulas, and leave the caller's data untouched."""

import pytest
import torch

from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.kernel import augment
from lossfloor.optimal.pool_cache import make_pools
from lossfloor.optimal.pools import Pool


def reference(data: torch.Tensor, dtype: torch.dtype) -> Pool:
    """The plain formulas: float64 copy, centre, squared norms, cast, augment."""
    x64 = data.reshape(data.shape[0], -1).to(torch.float64)
    xc = x64 - x64.mean(dim=0)
    sq = xc.pow(2).sum(dim=1)
    xd = xc.to(dtype)
    return Pool(
        x=xd,
        sq=sq.to(dtype),
        mean=x64.mean(dim=0),
        a=float(sq.mean()),
        max_sq=float(sq.max()),
        aug=augment(xd),
    )


def assert_same(p: Pool, q: Pool) -> None:
    for name in ("x", "sq", "mean", "aug"):
        a, b = (r.augmented() if name == "aug" else getattr(r, name) for r in (p, q))
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (p.a, p.max_sq) == (q.a, q.max_sq)


@pytest.mark.parametrize("data_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_data_bitwise_and_data_untouched(data_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(300, 2, 5, 7, generator=g) * 2 - 1).to(data_dtype) + 3.0
    before = data.clone()
    assert_same(Pool.from_data(data, dtype, "cpu"), reference(data, dtype))
    assert torch.equal(data, before)


@pytest.mark.parametrize("conditional", [False, True])
def test_make_pools_equal_gathered(conditional):
    g = torch.Generator().manual_seed(1)
    data = torch.randn(200, 12, generator=g)
    labels = torch.randint(3, (200,), generator=g)
    plan = OuterPlan.build(data, labels, 50, 0, conditional)
    pools = make_pools(plan, torch.float32, torch.device("cpu"))
    assert len(pools) == len(plan.groups)
    for pool, (members, _) in zip(pools, plan.groups, strict=True):
        assert_same(pool, reference(data[members], torch.float32))
