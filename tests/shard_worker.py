"""One process of tests/test_distributed_estimate.py's torchrun launch: ``lossfloor estimate``
scenarios on sharded data (``OUT/points.npy``, written by the test) in one process group, each
result (exit code, stderr) written to ``OUT/result-<rank>.json`` and rank 0's curves to
``OUT/<scenario>.json``.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 shard_worker.py OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from ddp_worker import cli

from lossfloor.data import chunked
from lossfloor.data.chunked import ChunkedDataset, open_chunked
from lossfloor.data.formats import Items
from lossfloor.distributed import launched
from lossfloor.optimal import estimate_curve, make_estimator
from lossfloor.optimal.checkpoint import Checkpoint

#: float64: the comparisons with one process are then tight (``_tolerance`` in the test: the
#: float32 closed form's rounding bound is ~1e-3 at σ = 0.5 here, above J* itself); the
#: "float32" scenario checks the float32 kernels within that bound
OPTIONS = ["--outer", "300", "--device", "cpu", "--dtype", "float64"]


def estimate(data: Path, limit: int = 300) -> list[str]:
    """The estimate every scenario runs, on the first ``limit`` points of ``data``."""
    return ["estimate", "--data", str(data), "--limit", str(limit), *OPTIONS, "--sigmas", "0.5,2"]


#: scenario → its options beyond ESTIMATE (the test runs each in one process too)
SCENARIOS = {
    "tilted": [],  # the default: full, draws auto = tilted
    "plain": ["--draws", "plain"],
    "snis": ["--estimator", "snis"],
    "dol": ["--estimator", "dol"],
    "cdol": ["--estimator", "cdol"],
    "float32": ["--dtype", "float32"],
    # streamed: each process reads its rows in chunks of 40 (and its statistics blocks); the
    # chunks of 2 processes start at rows 0 and 150, one process's at 0
    "stream": ["--stream", "--chunk-mb", "0.05"],
    "stream-plain": ["--stream", "--chunk-mb", "0.05", "--draws", "plain"],
    "stream-cdol": ["--stream", "--chunk-mb", "0.05", "--estimator", "cdol", "--dtype", "float32"],
    # adaptive sizes: each σ's M chosen from the pilot's merged values (here 3,072 and the cap)
    "adaptive": ["--target-rse", "0.003", "--outer", "1024", "--max-outer", "6144"],
}

#: gram on digits (1,797 points, D = 64), 6 σ, M = N: in memory and streamed (chunks of 29 rows:
#: a block of the draws' SAMPLE_BLOCK columns spans several), float64 and float32 (the test runs
#: each in one process, in memory)
GRAM = ["estimate", "--data", "digits", "--estimator", "gram", "--sigmas", "0.2,0.5,1,2,5,20",
        "--draws", "plain", "--device", "cpu"]  # fmt: skip
GRAM_SCENARIOS = {
    "gram": ["--dtype", "float64"],
    "gram-stream": ["--dtype", "float64", "--stream", "--chunk-mb", "0.05"],
    "gram-float32": ["--dtype", "float32"],
}

#: Gaussian items (``OUT/gauss.npz``: mean and std, written by the test): the full estimator of
#: the mixture, each process holding its half of the items (the test runs it in one process too)
GAUSSIAN = ["estimate", "--data", "{out}/gauss.npz", "--sigmas", "0.02,0.3,3", *OPTIONS]
GAUSSIAN_SCENARIOS = {"gaussian": []}

#: Rows per block of the streamed statistics pass here (5 blocks of the 300 points).
STATS_ROWS = 64


class Recording(Items):
    """Items that record the rows each read and take asks for."""

    def __init__(self, inner: Items) -> None:
        self.inner, self.reads, self.takes = inner, [], []
        self.n, self.shape, self.scale = inner.n, inner.shape, inner.scale
        self.labels, self.where = inner.labels, inner.where

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.reads.append([lo, hi])
        return self.inner.read(lo, hi)

    def take(self, idx) -> np.ndarray:
        if len(idx):
            self.takes.append([int(min(idx)), int(max(idx))])
        return self.inner.take(idx)


def streamed_reads(points: Path) -> dict:
    """The rows this process reads in a streamed estimate (full, tilted draws, M = 300)."""
    items = Recording(open_chunked(str(points)).items)
    data = ChunkedDataset("points", items, chunk_mb=0.05)
    estimate_curve(data, [2.0], make_estimator("full", 300), outer=300, progress=False)
    return {"reads": items.reads, "takes": items.takes}


def redo_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(points, sources, noise, σ) where gram redoes a row relative to its largest logit
    (tests/test_gram.py's case): two points ~e^450 more probable than the source at σ = 0.1;
    on 2 processes the source (point 0) is rank 0's, the two others rank 1's."""
    points = torch.zeros(3, 4, dtype=torch.float64)
    points[1, 0], points[2, 0], points[2, 1] = 3.0, 3.0, 1.0
    x_t = points[1] + torch.tensor([0.0, 0.45, 0.0, 0.0], dtype=torch.float64)
    noise = torch.stack([(x_t - points[0]) / 0.1, torch.ones(4, dtype=torch.float64)])
    return points, torch.tensor([0, 2]), noise, 0.1


def gram_pieces(group) -> dict:
    """gram's per-draw values and μ̂ (``posterior_mean``) of ``redo_case`` on this process's
    shard (the redone row's largest logit and the draws across the processes)."""
    from lossfloor.optimal.gram import Gram
    from lossfloor.optimal.shard import ShardedPool

    points, sources, noise, sigma = redo_case()
    pool = ShardedPool.from_shard(points, torch.float64, "cpu", group)
    est = Gram(inner=64)
    got = est(pool, sources, noise, sigma, torch.Generator().manual_seed(1))
    q = pool.rows(sources)[0] + sigma * noise
    mu = est.posterior_mean(pool, q, sources, sigma, torch.Generator().manual_seed(2))
    return {"closed": got.closed.tolist(), "direct": got.direct.tolist(), "mu": mu.tolist()}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    chunked.STATS_ROWS = STATS_ROWS
    with launched(torch.device("cpu")) as (group, _):
        results, base = {}, estimate(out / "points.npy")
        for name, options in SCENARIOS.items():
            argv = [*base, "--quiet", *options, "--out", str(out / f"{name}.json")]
            results[name] = cli(argv)
        # resume: a checkpoint of σ = 0.5 alone (kept: its removal patched away), then the grid
        resumed = out / "resumed.json"
        remove, Checkpoint.remove = Checkpoint.remove, lambda self: None
        try:
            results["first"] = cli([*base[:-1], "0.5", "--quiet", "--out", str(resumed)])
            across = str(out / "across.json")  # left for the test to resume in one process
            results["across"] = cli([*base[:-1], "0.5", "--quiet", "--out", across])
        finally:
            Checkpoint.remove = remove
        results["resumed"] = cli([*base, "--out", str(resumed)])  # not quiet: says it resumes
        results["resumed"]["partial_left"] = Path(f"{resumed}.partial").exists()
        other = estimate(out / "points.npy", 300 if group.rank == 0 else 299)  # other data on 1
        results["data"] = cli([*other, "--quiet"])
        for name, options in GRAM_SCENARIOS.items():
            results[name] = cli([*GRAM, "--quiet", *options, "--out", str(out / f"{name}.json")])
        for name, options in GAUSSIAN_SCENARIOS.items():
            argv = [a.format(out=out) for a in GAUSSIAN]
            results[name] = cli([*argv, "--quiet", *options, "--out", str(out / f"{name}.json")])
        results["gram-pieces"] = gram_pieces(group)
        results["reads"] = streamed_reads(out / "points.npy")
        summary = open_chunked(str(out / "points.npy")).summarise(group)
        results["fingerprints"] = [summary.sha256, summary.tensor_sha256]
        (out / f"result-{group.rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
