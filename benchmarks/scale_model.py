"""The scale model of issue 11: projected wall time of a full J* curve (32 σ, M = 10,000 draws,
the ``full`` estimator on tilted draws) on 1, 8 and 64 GPUs, from FLOP counts, stated GPU
assumptions and this machine's measured kernel throughput (docs/benchmarks.md, "Scale model").

FLOPs of the kernel: two GEMMs per tile, each 2·B·n·W for B queries, n keys, W = D + 2 padded to
a multiple of 8 (``kernel.augment``), so per σ 2 × 2·M·N·W; the neighbour index of the tilted
draws is one GEMM, 2·M·N·W, once per curve. Per outer block (B = 1,024 draws) and σ the K
processes all-reduce (``optimal/shard.py``) the merged softmax state [z | acc] (B·(D+1)
floats), the sources' rows (B·(D+1)) and the tilted draws' rows (up to 9·B·(D+1)), each a ring
all-reduce of 2(K−1)/K of its bytes over the bus bandwidth, plus a latency per collective.

    python benchmarks/scale_model.py                 # the markdown table
    python benchmarks/scale_model.py --json FILE     # and the numbers
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

from lossfloor.io import write_json

#: The curve: σ values, outer draws, the outer block.
SIGMAS, OUTER, BLOCK = 32, 10_000, 1024
#: Collectives per block and σ: MAX and SUM of the merge, SUM of the source rows and of the
#: tilted rows.
COLLECTIVES = 4
#: Rows all-reduced per block and σ, in units of B·(D+1) floats: state, sources, 9B tilt rows.
ROWS_PER_BLOCK = 1 + 1 + 9


@dataclass(frozen=True)
class Assumptions:
    """The GPU side: every number here is an assumption, not a measurement."""

    gpu: str = "H100 SXM / H200"
    fp32_peak: float = 67e12  # FLOP/s, FP32 without tensor cores (TF32 off: the default)
    efficiency: float = 0.6  # of fp32 peak: SGEMM ~0.75–0.8 of it × the kernel at 0.8 of SGEMM
    nvlink_bus: float = 350e9  # B/s, NCCL all-reduce bus bandwidth within a node of 8
    network_bus: float = 40e9  # B/s per GPU across nodes (8 × 400 Gb/s NDR per node)
    latency_node: float = 30e-6  # s per collective within a node
    latency_network: float = 100e-6  # s per collective across nodes
    gpus_per_node: int = 8
    memory_gb: float = 141.0  # H200 (an H100 holds 80)
    host_read: float = 25e9  # B/s per GPU, --stream from page cache over PCIe Gen5 (rows read
    #   once per outer block: M/B passes over the shard per σ, not overlapped with compute)


#: This machine (docs/benchmarks.md, "The kernel against bare GEMMs"): 2 threads, idle.
MEASURED_CPU_FLOPS = 132.8e9
#: Its full Fashion-MNIST curve (docs/benchmarks.md): 18–40 s per σ in float32, loaded machine.
FMNIST = {"n": 60_000, "d": 784, "outer": 10_000, "measured_s_per_sigma": (18.0, 40.0)}

DATASETS = {
    "CIFAR-10": (50_000, 3072),
    "ImageNet-64": (1_281_167, 12_288),
    "ImageNet-256 latents (32×32×4)": (1_281_167, 4096),
}


def width(d: int) -> int:
    """W: the augmented key width, D + 2 padded to a multiple of 8."""
    return -(-(d + 2) // 8) * 8


def flops_per_sigma(n: int, d: int, m: int = OUTER) -> float:
    """2 GEMMs × 2·M·N·W."""
    return 2 * 2 * m * n * width(d)


def curve_flops(n: int, d: int) -> float:
    """32 σ plus the neighbour index (one GEMM, 2·M·N·W)."""
    return SIGMAS * flops_per_sigma(n, d) + 2 * OUTER * n * width(d)


def comm_seconds(d: int, k: int, a: Assumptions) -> float:
    """All-reduces of one curve on k GPUs (0 for one)."""
    if k == 1:
        return 0.0
    blocks = math.ceil(OUTER / BLOCK)
    nbytes = ROWS_PER_BLOCK * BLOCK * (d + 1) * 4
    across = k > a.gpus_per_node
    bus = a.network_bus if across else a.nvlink_bus
    latency = a.latency_network if across else a.latency_node
    per_block = 2 * (k - 1) / k * nbytes / bus + COLLECTIVES * latency
    return SIGMAS * blocks * per_block


def device_bytes(n: int, d: int, k: int) -> tuple[float, float]:
    """(steady, transient) device bytes of the in-memory sharded pool per GPU: the centred
    rows and the augmented keys in float32 (steady), plus the float64 copy and centring while
    they are built (transient)."""
    rows = math.ceil(n / k)
    steady = rows * (d + width(d)) * 4
    return steady, steady + rows * d * 16


def stream_seconds(n: int, d: int, k: int, a: Assumptions) -> float:
    """--stream: the shard's float32 rows read M/B times per σ (and once for the index)."""
    passes = SIGMAS * math.ceil(OUTER / BLOCK) + math.ceil(OUTER / BLOCK)
    return passes * math.ceil(n / k) * d * 4 / a.host_read


def model(a: Assumptions) -> list[dict]:
    rate = a.fp32_peak * a.efficiency
    rows = []
    for name, (n, d) in DATASETS.items():
        for k in (1, 8, 64):
            compute = curve_flops(n, d) / (k * rate)
            comm = comm_seconds(d, k, a)
            _, transient = device_bytes(n, d, k)
            fits = transient <= a.memory_gb * 1e9
            streamed = stream_seconds(n, d, k, a)
            rows.append({
                "dataset": name, "n": n, "d": d, "gpus": k, "pflop": curve_flops(n, d) / 1e15,
                "compute_s": compute, "comm_s": comm, "total_s": compute + comm,
                "fits_in_memory": fits, "device_gb": transient / 1e9,
                "stream_read_s": streamed,
                "total_streamed_s": compute + streamed + comm,  # reads do not overlap compute
            })  # fmt: skip
    return rows


def _t(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def table(rows: list[dict]) -> str:
    lines = [
        "| data | N × D | PFLOP | GPUs | compute | all-reduce | **total** | in GPU memory? "
        "| with --stream (reads at 25 GB/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "yes" if r["fits_in_memory"] else f"no ({r['device_gb']:.0f} GB)"
        lines.append(
            f"| {r['dataset']} | {r['n']:,} × {r['d']:,} | {r['pflop']:.3g} | {r['gpus']} "
            f"| {_t(r['compute_s'])} | {_t(r['comm_s'])} | **{_t(r['total_s'])}** | {mem} "
            f"| {_t(r['total_streamed_s'])} |"
        )
    return "\n".join(lines)


def calibration() -> str:
    """The model's rate on this machine against its measured Fashion-MNIST curve."""
    f = FMNIST
    predicted = flops_per_sigma(f["n"], f["d"], f["outer"]) / MEASURED_CPU_FLOPS
    lo, hi = f["measured_s_per_sigma"]
    return (
        f"Fashion-MNIST (N = 60,000, D = 784, M = 10,000) on this VM at its measured "
        f"{MEASURED_CPU_FLOPS / 1e9:.0f} GFLOP/s: {predicted:.1f} s per σ predicted, "
        f"{lo:.0f}–{hi:.0f} s measured (float32, loaded machine): the model is "
        f"{lo / predicted:.1f}–{hi / predicted:.1f}× optimistic there."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--efficiency", type=float, default=Assumptions.efficiency)
    ap.add_argument("--json", default=None, help="also write the rows and assumptions here")
    args = ap.parse_args()
    a = Assumptions(efficiency=args.efficiency)
    rows = model(a)
    print(table(rows))
    print()
    print(calibration())
    cpu = {name: curve_flops(n, d) / MEASURED_CPU_FLOPS for name, (n, d) in DATASETS.items()}
    print("this VM at that rate: " + ", ".join(f"{k} {_t(v)}" for k, v in cpu.items()))
    if args.json:
        write_json(args.json, {"assumptions": asdict(a), "rows": rows})


if __name__ == "__main__":
    main()
