"""The pools are the only data interface of the estimators: nothing outside the pool kinds
(optimal/pools.py, shard.py, stream.py, mixture.py) reads a pool's arrays (``x``, ``sq``,
``aug``, ``mean``), and each ``Pool`` method gives what those arrays gave, on every pool kind:
in memory, sharded (one process of one: the same code path as K, with its collectives the
identity) and streamed (chunks smaller than the data)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from lossfloor.data.chunked import open_chunked
from lossfloor.distributed import Group
from lossfloor.optimal.kernel import Adjust, accumulate_softmax
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.shard import ShardedPool
from lossfloor.optimal.stream import StreamedPool

SRC = Path(__file__).resolve().parents[1] / "src" / "lossfloor"
#: The modules that implement the pool kinds: the only ones that read a pool's arrays.
POOL_KINDS = {
    "optimal/pools.py", "optimal/shard.py", "optimal/stream.py", "optimal/mixture.py",
}  # fmt: skip
ARRAYS = {"x", "sq", "aug", "mean"}


def pool_array_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, expression) of each read of ``.x``/``.sq``/``.aug``/``.mean`` of an expression
    that names a pool (``pool``, ``pools[0]``, ``self.pool``, ``bound_pool``: a chain of names,
    attributes and subscripts one of which contains "pool"; a method's result, such as
    ``pool.accumulate(q).mean``, is not a pool)."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ARRAYS
            and any("pool" in name.lower() for name in _chain(node.value))
        ):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def _chain(expr: ast.expr) -> list[str]:
    """The names along ``a.b[i].c`` (c, b, a); empty where a call or other expression ends it."""
    names = []
    while True:
        if isinstance(expr, ast.Name):
            return [*names, expr.id]
        if isinstance(expr, ast.Attribute):
            names.append(expr.attr)
            expr = expr.value
        elif isinstance(expr, ast.Subscript):
            expr = expr.value
        else:
            return []


def test_nothing_outside_the_pool_kinds_reads_a_pools_arrays():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in POOL_KINDS:
            continue
        for line, expr in pool_array_reads(ast.parse(path.read_text(), str(path))):
            found.append(f"src/lossfloor/{rel}:{line}: {expr}")
    assert not found, "pool arrays read outside the pool kinds:\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_read():
    text = (
        "a = pool.x[i]\nb = pools[0].aug.shape\nc = self.pool.mean\nd = data.x\ne = p.sq\n"
        "f = pool.accumulate(q).mean()\n"
    )
    assert [e for _, e in pool_array_reads(ast.parse(text))] == [
        "pool.x",
        "pools[0].aug",
        "self.pool.mean",
    ]


N, D = 40, 5


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Pool]:
    """The same data (float64) as each pool kind; the streamed one in chunks of ~7 rows."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(N, D, generator=g)
    path = tmp_path_factory.mktemp("pools") / "points.npy"
    np.save(path, data.numpy())
    chunked = open_chunked(str(path), chunk_mb=7 * (12 + 16) * D / 2**20)
    chunked.summarise()
    return {
        "memory": Pool.from_data(data, torch.float64, "cpu"),
        "sharded": ShardedPool.from_shard(data, torch.float64, "cpu", Group()),
        "streamed": StreamedPool.from_stream(chunked, torch.float64, "cpu", Group()),
    }


@pytest.mark.parametrize("kind", ["memory", "sharded", "streamed"])
def test_each_pool_kind_gives_the_rows_norms_means_and_centring_of_the_data(kinds, kind):
    pool, ref = kinds[kind], kinds["memory"]
    idx = torch.tensor([[3, 0, 39], [7, 7, 12]])
    x, sq = pool.rows(idx)
    assert x.shape == (2, 3, D) and sq.shape == (2, 3)
    torch.testing.assert_close(x, ref.x[idx], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq, (ref.x[idx] ** 2).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool.norms(idx), sq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool.mean_rows(idx), ref.x[idx].mean(1), rtol=1e-12, atol=1e-12)
    batch = torch.randn(4, D, dtype=torch.float32)
    torch.testing.assert_close(pool.centre(batch), batch.double() - ref.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(pool.uncentre(pool.centre(batch)), batch.double(), rtol=0, atol=1e-6)
    assert (pool.dtype, pool.device, pool.width, pool.n, pool.dim) == (
        torch.float64, torch.device("cpu"), ref.width, N, D
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["memory", "sharded", "streamed"])
def test_each_pool_kind_accumulates_weighted_and_adjusted_keys_by_index(kinds, kind):
    """``accumulate`` over the keys of an index with per-key log-weights and per-pair additions
    (stratified's far sample) equals the kernel on the gathered keys, whatever the chunks."""
    pool, ref = kinds[kind], kinds["memory"]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, D, generator=g, dtype=torch.float64)
    idx = torch.randperm(N, generator=g)[:25].sort().values
    logw = torch.rand(25, generator=g, dtype=torch.float64)
    pos = torch.randint(-1, 25, (6, 3), generator=g)
    adjust = Adjust.from_positions(pos, torch.randn(6, 3, generator=g, dtype=torch.float64))
    want = accumulate_softmax(q, ref.x[idx], 0.8, key_logw=logw, adjust=adjust).mean()
    state = pool.accumulate(q, 0.8, idx, key_logw=logw, adjust=adjust, tile_bytes=64 * 6 * 8)
    torch.testing.assert_close(pool.merge(state).mean(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["memory", "sharded", "streamed"])
def test_each_pool_kind_gives_the_products_with_its_rows_and_the_bags_of_rows(kinds, kind):
    """``products``: rows·Xᵀ and ½‖x‖² over the rows a process holds (here all N; the streamed
    pool per chunk of ~7 rows), padded with products 0 and ½‖x‖² = +∞; ``bags``: each row of an
    index's mean row and the norms, as ``mean_rows`` and ``norms`` give them."""
    pool, ref = kinds[kind], kinds["memory"]
    q = torch.randn(3, D, dtype=torch.float64)
    assert pool.n_held == N
    prod, half_sq = pool.products(pad=4)(q)
    assert prod.shape == (3, N + 4) and half_sq.shape == (N + 4,)
    torch.testing.assert_close(prod[:, :N], q @ ref.x.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(half_sq[:N], 0.5 * (ref.x**2).sum(1), rtol=1e-12, atol=1e-12)
    assert bool((prod[:, N:] == 0).all()) and bool((half_sq[N:] == torch.inf).all())
    idx = torch.tensor([[3, 0, 39, 3], [7, 7, 12, 20], [1, 2, 3, 4]])
    mean, norms = pool.bags(idx)
    torch.testing.assert_close(mean, ref.x[idx].mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norms, (ref.x[idx] ** 2).sum(-1), rtol=1e-12, atol=1e-12)
