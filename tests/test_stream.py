"""Streamed estimation (``estimate --stream``, ``data.chunked``, ``optimal.stream``): the numbers
of the in-memory path from items read in chunks, and reads that never hold more than a chunk.
(Two processes streaming their shards: tests/test_distributed_estimate.py.)"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import assert_same_point, pool_of, rounding_bound, sum_rtol

import lossfloor.cli
from lossfloor.data import chunked as chunked_module
from lossfloor.data import load_dataset, mean_and_variance
from lossfloor.data.chunked import ChunkedDataset, open_chunked
from lossfloor.data.formats import Items
from lossfloor.distributed import Group
from lossfloor.errors import UserError
from lossfloor.optimal import estimate_curve, make_estimator
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.kernel import logit_error_bound
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.stream import StreamedPool, chunk_rows

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

#: The per-σ numbers of a curve (not its timings).
NUMBERS = ("optimal_loss", "stderr", "closed", "closed_stderr", "direct", "direct_stderr")
NUMBERS += ("combined_weight_closed", "ess", "dtype")

N, D, SIGMAS = 300, 64, [0.5, 2.0]
#: A tile of 64 keys for a block of 300 float32 queries; chunks of 2 tiles (128 rows).
TILE_BYTES = 64 * 4 * N
CHUNK_MB = 128 * (12 + 2 * 4) * D / 2**20


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> Path:
    """300 Gaussian points in 64 dims (general position), float32, as an .npy file."""
    path = tmp_path_factory.mktemp("stream") / "points.npy"
    g = torch.Generator().manual_seed(3)
    np.save(path, (0.5 * torch.randn(N, D, generator=g)).numpy())
    return path


class Counting(Items):
    """Items that record the rows of every read and take of the items they wrap."""

    def __init__(self, inner: Items) -> None:
        self.inner, self.reads, self.takes = inner, [], []
        self.n, self.shape, self.scale = inner.n, inner.shape, inner.scale
        self.labels, self.where = inner.labels, inner.where

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.reads.append(hi - lo)
        return self.inner.read(lo, hi)

    def take(self, idx) -> np.ndarray:
        self.takes.append(len(idx))
        return self.inner.take(idx)


def _numbers(curve) -> list[dict]:
    return [{k: getattr(p, k) for k in ("sigma", *NUMBERS)} for p in curve.points]


def _curves(spec: str, name: str, draws: str, precision: str = "auto", **stream):
    """(in memory, streamed) curves of ``spec`` for estimator ``name``, M = N."""
    ds = load_dataset(spec)
    est = make_estimator(name, ds.n)
    opts = dict(draws=draws, precision=precision, tile_bytes=TILE_BYTES, progress=False)
    memory = estimate_curve(ds, SIGMAS, est, **opts)
    streamed = estimate_curve(open_chunked(spec, **stream), SIGMAS, est, **opts)
    return memory, streamed


@pytest.mark.parametrize(
    ("name", "draws"),
    [("full", "tilted"), ("full", "plain"), ("snis", "plain"), ("dol", "plain"), ("cdol", "plain")],
)
def test_an_npy_read_in_chunks_gives_the_numbers_of_the_data_in_memory(points, name, draws):
    # chunks of whole tiles and x̄ from one block (N < 4096, the bits of torch's mean): bitwise
    memory, streamed = _curves(str(points), name, draws, chunk_mb=CHUNK_MB)
    assert chunk_rows(CHUNK_MB, D, torch.float32) == 128
    assert _numbers(streamed) == _numbers(memory)
    assert streamed.data_variance == memory.data_variance
    assert streamed.dataset == {**memory.dataset, "streamed": True}  # the same sha256


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """150 pairs of points at distance 1 in 16 dims, the pairs ~17 apart, float32, as an .npy:
    below σ ≈ 0.1 J* rests on the draws that cross to the partner, ~Φ(−1/2σ)."""
    g = torch.Generator().manual_seed(8)
    centres = 3 * torch.randn(150, 16, generator=g, dtype=torch.float64)
    step = torch.randn(150, 16, generator=g, dtype=torch.float64)
    x = torch.cat([centres, centres + step / step.norm(dim=1, keepdim=True)])
    path = tmp_path_factory.mktemp("pairs") / "pairs.npy"
    np.save(path, x.float().numpy())
    return path


@pytest.mark.parametrize("draws", ["plain", "tilted"])
def test_streamed_j_star_at_small_sigma_is_the_in_memory_one(pairs, draws):
    """σ = 0.05 (J* ≈ 1e-24 on tilted draws) and σ = 0.3 (≈ 1e-4), float32: in memory one
    kernel tile, streamed in chunks of 6 rows (the sources in every chunk but the first). Each
    draw's μ has the source's x exactly where the others' weights are below its last bit (all
    plain draws at σ = 0.05: J* = 0 in both), so J* agrees in relative terms. Before issue 27
    the streamed source weighed a rounded e^Δ against a lagging max: μ an ulp off, ‖x0 − μ‖²
    ~ (u·x)², a J* of ~1e-17 at σ = 0.05 against 1e-24 (0 on plain draws)."""
    sigmas = [0.05, 0.3]
    ds = load_dataset(str(pairs))
    est = make_estimator("full", ds.n)
    opts = dict(draws=draws, precision="float32", progress=False)
    memory = estimate_curve(ds, sigmas, est, **opts)
    chunked = open_chunked(str(pairs), chunk_mb=6 * 20 * ds.dim / 2**20)
    streamed = estimate_curve(chunked, sigmas, est, **opts)
    exact = estimate_curve(ds, sigmas, est, **{**opts, "precision": "float64"})
    assert chunk_rows(chunked.chunk_mb, ds.dim, torch.float32) == 6
    pool = Pool.from_data(ds.x, torch.float32, "cpu")
    for s, m, e in zip(streamed.points, memory.points, exact.points, strict=True):
        # the kernel's float32 logits are off by at most δ (kernel.logit_error_bound) in either
        # run, so each posterior weight by e^{±2δ}, and J* (~ weight²) by ~4δ relative
        tol = 4 * logit_error_bound(pool.max_sq, ds.dim, s.sigma, torch.float32)
        for key in ("optimal_loss", "direct", "stderr", "direct_stderr", "ess"):
            assert getattr(s, key) == pytest.approx(getattr(m, key), rel=tol, abs=0), key
            assert getattr(m, key) == pytest.approx(getattr(e, key), rel=tol, abs=1e-30), key
    small = memory.points[0]
    if draws == "tilted":
        assert 1e-28 < small.optimal_loss < 1e-20 and small.ess > 10
    else:
        assert small.optimal_loss == 0.0 and small.ess == 0.0


@pytest.mark.parametrize("name", ["full", "cdol"])
def test_chunks_that_cut_the_tiles_give_the_same_numbers_to_float64_rounding(points, name):
    # 11-row chunks: the kernel's tiles end at each chunk, so sums run in another order
    memory, streamed = _curves(str(points), name, "plain", "float64", chunk_mb=11 * 28 * D / 2**20)
    pool = pool_of(points, "float64")
    for s, m in zip(streamed.points, memory.points, strict=True):
        assert (s.sigma, s.dtype) == (m.sigma, m.dtype) == (s.sigma, "float64")
        assert_same_point(s.to_json(), m.to_json(), rounding_bound(pool, m.sigma, "plain"), N)


def _images(tmp_path: Path) -> tuple[Path, Path]:
    """130 RGB 8×8 PNGs in two class folders, and the same as an EDM zip with labels."""
    rng = np.random.default_rng(5)
    folder, buffers = tmp_path / "folder", {}
    for i in range(130):
        arr = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        name = f"{'ab'[i % 2]}/{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="png")
        buffers[f"{i:05d}.png"] = buf.getvalue()
    zipped = tmp_path / "images.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name, data in buffers.items():
            zf.writestr(name, data)
        labels = [[name, int(name[:5]) % 2] for name in buffers]
        zf.writestr("dataset.json", f'{{"labels": {labels}}}'.replace("'", '"'))
    return folder, zipped


@pytest.mark.slow
def test_an_image_folder_and_a_zip_streamed_give_the_numbers_in_memory(tmp_path):
    for spec in map(str, _images(tmp_path)):
        ds = load_dataset(spec)
        est = make_estimator("full", ds.n)
        # tiles of 64 keys (the kernel's least), chunks of one tile: 64 + 64 + 2 rows
        opts = dict(sigmas=SIGMAS, estimator=est, tile_bytes=64 * 4 * ds.n, progress=False)
        memory = estimate_curve(ds, **opts)
        items = open_chunked(spec, chunk_mb=64 * 20 * ds.dim / 2**20)
        streamed = estimate_curve(items, **opts)
        # pixel data: float64 sums exact in any order, so x̄ and every row are one process's
        assert _numbers(streamed) == _numbers(memory)
        assert streamed.data_variance == memory.data_variance
        assert torch.equal(items.labels, ds.labels)
        assert items.summary.mean.tolist() == ds.flat().double().mean(dim=0).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("stats_rows", [7, 4096])
def test_one_fingerprint_however_the_data_are_read(points, tmp_path, monkeypatch, stats_rows):
    """An .npy of floats, channels-last uint8 images in an .npy, an image folder, an EDM zip
    and a named source: streamed (any statistics block, any chunk) they carry the sha256 of
    the same items in memory, and their draws the in-memory plan's fingerprint (the key of
    checkpoints, the neighbour index and cached J*). (Two processes: test_distributed_estimate.)"""
    monkeypatch.setattr(chunked_module, "STATS_ROWS", stats_rows)
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(2).integers(0, 256, (40, 6, 5, 3), dtype=np.uint8))
    for spec in [str(points), str(images), *map(str, _images(tmp_path)), "digits"]:
        ds = load_dataset(spec, limit=150)
        plan = OuterPlan.build(ds.x, None, 10, 0, False).fingerprint
        for chunk_mb in (0.01, 256.0):
            data = open_chunked(spec, limit=150, chunk_mb=chunk_mb)
            data.summarise()
            assert data.sha256 == ds.sha256, spec
            assert OuterPlan.build(data, None, 10, 0, False).fingerprint == plan, spec


def test_diagnose_takes_a_streamed_estimate_of_the_data_it_diagnoses(points, tmp_path, capsys):
    """estimate --stream, then diagnose --curve on the same .npy in memory: the estimate is of
    this data (one sha256), and its J* is the curve's direct form."""
    est, out = tmp_path / "c.json", tmp_path / "d.json"
    assert lossfloor.cli.main(["estimate", "--data", str(points), "--stream", "--chunk-mb",
                               str(CHUNK_MB), "--sigmas", "0.5,2", "--outer", "300", "--draws",
                               "plain", "--quiet", "--out", str(est)]) == 0  # fmt: skip
    curve = json.loads(est.read_text())
    assert curve["dataset"]["streamed"] is True
    diagnose = ["diagnose", "--model", "optimal", "--data", str(points), "--no-cache", "--quiet"]
    assert lossfloor.cli.main([*diagnose, "--curve", str(est), "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    got = json.loads(out.read_text())
    assert (
        got["optimal_from"] == str(est) and got["dataset"]["sha256"] == curve["dataset"]["sha256"]
    )
    assert [p["optimal_loss"] for p in got["points"]] == [p["direct"] for p in curve["points"]]


def test_the_statistics_pass_matches_the_data_in_memory(points, monkeypatch):
    monkeypatch.setattr(chunked_module, "STATS_ROWS", 7)  # 43 blocks
    x = load_dataset(str(points)).flat().double()
    s = open_chunked(str(points)).summarise()
    sq = (x - x.mean(dim=0)).pow(2).sum(dim=1)
    # 43 blocks merged against one sum over N rows: the sums' rounding (sum_rtol), signed
    # terms for the mean (absolute, to the mean |x|), squares for the rest (the mean's error
    # enters them squared)
    atol = sum_rtol(N) * float(x.abs().mean(dim=0).max())
    torch.testing.assert_close(s.mean, x.mean(dim=0), rtol=0, atol=atol)
    assert s.sq_sum == pytest.approx(float(sq.sum()), rel=sum_rtol(N + D))
    assert s.sq_max == pytest.approx(float(sq.max()), rel=sum_rtol(D))
    assert s.variance == pytest.approx(mean_and_variance(x)[1], rel=sum_rtol(N + D))
    other = np.load(points)
    other[150, 3] += 1e-3
    np.save(points.parent / "other.npy", other)
    assert open_chunked(str(points.parent / "other.npy")).summarise().sha256 != s.sha256


def test_the_reader_never_holds_more_than_a_chunk(points, monkeypatch):
    """Full (plain draws, M = 64) and snis on 300 points in chunks of 128 rows: every read of
    rows is at most a chunk or a statistics block (64 rows here); reads by index are the
    block's 64 sources or snis's inner set in chunks."""
    monkeypatch.setattr(chunked_module, "STATS_ROWS", 64)
    for name in ("full", "snis"):
        items = Counting(open_chunked(str(points)).items)
        data = ChunkedDataset(str(points), items, chunk_mb=CHUNK_MB)
        est = make_estimator(name, N, inner=200 if name == "snis" else None)
        estimate_curve(
            data, SIGMAS, est, outer=64, draws="plain", tile_bytes=TILE_BYTES, progress=False
        )
        assert max(items.reads) <= 128
        # full: each block's 64 sources; snis also its 200 inner points in chunks (128 + 72)
        assert set(items.takes) == ({64} if name == "full" else {64, 128, 72})
        if name == "full":  # 2 statistics passes, then every σ's one block streams all rows
            assert sum(items.reads) == 2 * N + len(SIGMAS) * N


def test_a_streamed_pool_holds_no_rows(points):
    data = open_chunked(str(points))
    data.summarise()
    pool = StreamedPool.from_stream(data, torch.float32, "cpu", Group())
    assert pool.x.shape == (0, D) and pool.augmented().shape[0] == 0
    assert (pool.n, pool.dim, pool.shards) == (N, D, 1)
    idx = torch.tensor([5, 0, 5, 299])
    rows, sq = pool.rows(idx)
    whole = Pool.from_data(torch.from_numpy(np.load(points)), torch.float32, "cpu")
    assert torch.equal(rows, whole.x[idx]) and torch.equal(sq, whole.sq[idx])


def test_what_streaming_does_not_do_is_one_line(points, tmp_path, capsys):
    base = ["estimate", "--data", str(points), "--stream", "--sigmas", "1", "--quiet"]
    for extra, says in [
        (["--xflip"], "--xflip: not with --stream"),
        (["--chunk-mb", "0"], "chunk"),
    ]:
        assert lossfloor.cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    np.savez(tmp_path / "p.npz", x=np.zeros((3, 2)))
    with pytest.raises(UserError, match="an .npz is read whole"):
        open_chunked(str(tmp_path / "p.npz"))


def test_an_npy_is_read_by_rows_in_the_layout_and_scale_of_load_dataset(tmp_path):
    """Channels-last uint8 images (N×H×W×C) and 3-d gray ones, read by rows, index and whole,
    are load_dataset's items; a truncated file or Fortran order is one line."""
    rng = np.random.default_rng(1)
    for shape in [(23, 6, 5, 3), (23, 6, 5)]:
        path = tmp_path / f"{len(shape)}.npy"
        np.save(path, rng.integers(0, 256, size=shape, dtype=np.uint8))
        ds, data = load_dataset(str(path)), open_chunked(str(path), limit=20)
        assert (data.n, data.shape) == (20, ds.shape)
        flat = ds.flat()
        assert torch.equal(data.rows(3, 11), flat[3:11])
        assert torch.equal(data.take(torch.tensor([19, 0, 19, 7])), flat[[19, 0, 19, 7]])
        assert data.rows(5, 5).shape == (0, ds.dim)
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((10, 4), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match="truncated"):
        open_chunked(str(path)).rows(0, 10)
    np.save(path, np.asfortranarray(np.zeros((10, 4), dtype=np.float32)))
    with pytest.raises(UserError, match="Fortran order"):
        open_chunked(str(path))


def test_data_larger_than_the_memory_budget_is_streamed_and_says_so(points, tmp_path, capsys):
    out = tmp_path / "auto.json"
    base = ["estimate", "--data", str(points), "--sigmas", "2", "--outer", "64", "--quiet"]
    assert lossfloor.cli.main([*base, "--memory-gb", "0.0001", "--out", str(out)]) == 0
    # 300 × 64 elements × 20 bytes (items, float64 copy, centred rows, keys) = 0.000358 GiB
    assert "needs ~0.000358 GiB per process in memory, more than" in capsys.readouterr().err
    assert json.loads(out.read_text())["dataset"]["streamed"] is True
    assert lossfloor.cli.main([*base, "--memory-gb", "1", "--out", str(out)]) == 0
    assert "streaming" not in capsys.readouterr().err
    assert "streamed" not in json.loads(out.read_text())["dataset"]
    assert lossfloor.cli.main([*base, "--memory-gb", "nan"]) == 2
    assert "--memory-gb nan: must be a finite number" in capsys.readouterr().err


def test_the_memory_rule_that_makes_an_estimate_stream_is_the_library_s(points, monkeypatch):
    """need = n·D·(4 + (IN_MEMORY_BYTES − 4)/K) bytes per process of K; budget = the bytes
    given, else the memory available / LOCAL_WORLD_SIZE; a named source never streams."""
    from lossfloor.optimal import stream
    from lossfloor.optimal.stream import IN_MEMORY_BYTES, memory_need

    need = memory_need(str(points), memory_bytes=1e9)
    assert (need.need, need.budget, need.stream) == (300 * 64 * IN_MEMORY_BYTES, 1e9, False)
    assert memory_need(str(points), world=4, memory_bytes=1.0).need == 300 * 64 * (4 + 16 / 4)
    small = memory_need(str(points), limit=100, memory_bytes=100 * 64 * IN_MEMORY_BYTES - 1)
    assert small.need == 100 * 64 * IN_MEMORY_BYTES and small.stream
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(stream, "available_bytes", lambda: 1000.0)
    assert memory_need(str(points)).budget == 500.0
    assert memory_need("digits") is None


def test_estimate_curve_given_a_path_streams_where_memory_is_short_as_the_cli_does(
    points, monkeypatch, caplog
):
    """The library's rule (``stream.must_stream``), not only the CLI's: a path that does not fit
    the memory available is read in chunks (the same numbers as ``open_chunked``'s, bitwise in
    one run), with a log record; one that fits is loaded (those of ``load_dataset``)."""
    from lossfloor.optimal import stream

    kw = {"sigmas": [0.5, 2.0], "outer": 64, "progress": False, "device": "cpu"}
    monkeypatch.setattr(stream, "available_bytes", lambda: 1000.0)
    with caplog.at_level("INFO", logger="lossfloor.optimal.stream"):
        short = estimate_curve(str(points), **kw)
    assert short.dataset["streamed"] is True
    assert "streaming it" in caplog.text
    assert _numbers(short) == _numbers(estimate_curve(open_chunked(str(points)), **kw))
    monkeypatch.setattr(stream, "available_bytes", lambda: 1e12)
    fits = estimate_curve(str(points), **kw)
    assert "streamed" not in fits.dataset
    assert _numbers(fits) == _numbers(estimate_curve(load_dataset(str(points)), **kw))


@pytest.mark.slow
def test_adaptive_sizes_streamed_give_the_numbers_in_memory(points):
    """--target-rse on streamed data: the same pilot, the same chosen M per σ, the same bits."""
    ds = load_dataset(str(points))
    est = make_estimator("full", ds.n)
    opts = dict(outer=1024, target_rse=0.003, max_outer=6144, tile_bytes=TILE_BYTES,
                progress=False)  # fmt: skip
    memory = estimate_curve(ds, SIGMAS, est, **opts)
    streamed = estimate_curve(open_chunked(str(points), chunk_mb=CHUNK_MB), SIGMAS, est, **opts)
    assert [p.outer for p in streamed.points] == [p.outer for p in memory.points]
    # σ = 2 stops between the pilot and the cap (3,072), σ = 0.5 at the cap (6,144)
    assert len({p.outer for p in memory.points} - {1024}) == 2
    assert _numbers(streamed) == _numbers(memory)
