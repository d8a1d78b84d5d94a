"""Kernel throughput on Fashion-MNIST shapes (N = 60,000, D = 784).

1. The streaming posterior-mean kernel against a bare ``torch.mm`` of the same GEMM shapes
   (logits q·Xᵀ and weights·X per tile), in the same run: ratio = t_mm / t_kernel.
2. Against a straightforward implementation that materialises x_t − x0 differences.
3. float32 against float64 J* at small σ (where the expanded form loses digits).

Usage: python benchmarks/bench_kernel.py [--out docs/bench_kernel.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import best_time, interleaved_times, machine

from lossfloor.data import load_dataset
from lossfloor.io import write_json
from lossfloor.optimal import Pool, estimate_curve, make_estimator
from lossfloor.optimal.kernel import augment, keys_per_tile, posterior_mean


def gemm_ratio(x: torch.Tensor, batch: int, tile_mb: float, repeat: int) -> dict:
    """The kernel against bare ``torch.mm`` calls of exactly its GEMM shapes and orientations
    (keys_aug·q_augᵀ, then weightsᵀ·keys_aug, per tile), timed alternately."""
    q = x[:batch] + 3.0 * torch.randn(batch, x.shape[1])
    tile = int(tile_mb * 2**20)
    step = keys_per_tile(batch, 4, tile)
    keys_aug = augment(x)  # built once per dataset, as the estimators' Pool does
    q_aug = torch.zeros(batch, keys_aug.shape[1])
    q_aug[:, : x.shape[1]] = q
    chunks = [keys_aug[i : i + step] for i in range(0, x.shape[0], step)]

    def bare() -> None:
        acc = torch.zeros(batch, keys_aug.shape[1])
        for c in chunks:
            acc += torch.mm(torch.mm(c, q_aug.T).T, c)

    def kernel() -> None:
        posterior_mean(q, None, 3.0, keys_aug=keys_aug, tile_bytes=tile)

    t_mm, t_k = interleaved_times(bare, kernel, repeat)
    flops = 4.0 * batch * x.shape[0] * keys_aug.shape[1]
    return {
        "batch": batch,
        "tile_mb": tile_mb,
        "keys_per_tile": step,
        "width": keys_aug.shape[1],
        "mm_seconds": t_mm,
        "kernel_seconds": t_k,
        "mm_gflops": flops / t_mm / 1e9,
        "kernel_gflops": flops / t_k / 1e9,
        "ratio": t_mm / t_k,
    }


def naive_posterior_mean(q: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The straightforward form: materialise all differences x_t − x0 (B×N×D)."""
    d2 = (q[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ x


def naive_comparison(x: torch.Tensor, batch: int) -> dict:
    q = x[:batch] + 3.0 * torch.randn(batch, x.shape[1])
    t_naive = best_time(lambda: naive_posterior_mean(q, x, 3.0), repeat=1)
    qk = x[:1024] + 3.0 * torch.randn(1024, x.shape[1])
    t_kernel = best_time(lambda: posterior_mean(qk, x, 3.0), repeat=1)
    per_naive, per_kernel = t_naive / batch, t_kernel / 1024
    ref = naive_posterior_mean(q, x, 3.0).double()
    got = posterior_mean(q, x, 3.0).double()
    return {
        "naive_batch": batch,
        "naive_seconds_per_query": per_naive,
        "kernel_seconds_per_query": per_kernel,
        "speedup": per_naive / per_kernel,
        "naive_peak_bytes": batch * x.shape[0] * x.shape[1] * 4,
        "kernel_tile_bytes": 32 * 2**20,
        "max_abs_difference": float((ref - got).abs().max()),
    }


def precision_check(x: torch.Tensor, sigmas: list[float], outer: int) -> list[dict]:
    est = make_estimator("full", x.shape[0])
    kw = dict(outer=outer, seed=0, progress=False, form="direct")
    f64 = estimate_curve(x, sigmas, est, precision="float64", **kw)
    f32 = estimate_curve(x, sigmas, est, precision="float32", **kw)
    auto = estimate_curve(x, sigmas, est, precision="auto", **kw)
    rows = []
    for i, s in enumerate(sigmas):
        a, b = f32.values[i], f64.values[i]
        rows.append(
            {
                "sigma": s,
                "float64": b,
                "float32": a,
                "relative_difference": abs(a - b) / b if b > 0 else None,
                "stderr_float64": f64.stderrs[i],
                "auto_dtype": auto.points[i].dtype,
                "seconds_float32": f32.points[i].seconds,
                "seconds_float64": f64.points[i].seconds,
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench_kernel.json")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ds = load_dataset("fashion-mnist")
    x = Pool.from_data(ds.x, torch.float32, "cpu").x
    result: dict = {"machine": machine(), "dataset": ds.describe()}
    t0 = time.perf_counter()
    result["gemm_ratio"] = [
        gemm_ratio(x, b, mb, args.repeat) for b in (1024,) for mb in (4, 8, 32, 128)
    ]
    print(json.dumps(result["gemm_ratio"], indent=1), file=sys.stderr)
    result["naive"] = naive_comparison(x, batch=4)
    print(json.dumps(result["naive"], indent=1), file=sys.stderr)
    result["precision"] = precision_check(
        x[:10000], [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0], outer=4096
    )
    print(json.dumps(result["precision"], indent=1), file=sys.stderr)
    result["seconds"] = time.perf_counter() - t0
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
