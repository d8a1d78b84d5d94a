"""Peak memory of ``lossfloor estimate --stream`` on a synthetic float32 .npy larger than the
process may hold (docs/benchmarks.md, "Data larger than memory (issue 11)").

Writes an N×D float32 .npy (N(0, 0.25) entries, in chunks), then runs the estimate in a child
process whose address space is capped (RLIMIT_AS, as ``prlimit --as``) below the file's size:
first in memory (``load_dataset``: expected to fail), then streamed; reports each child's exit
code, wall time, peak resident memory (VmHWM) and peak address space (VmPeak), and J*. The file
is deleted afterwards (unless --keep).

    OMP_NUM_THREADS=1 python benchmarks/bench_stream.py --rows 350000 --dim 3072 \\
        --cap-gb 2 --outer 128 --sigmas 5,20 --out docs/results/bench_stream.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lossfloor.io import write_json


def write_npy(path: Path, rows: int, dim: int, chunk: int = 8192) -> None:
    """An N×D float32 .npy of N(0, 0.25) entries, written in chunks (bounded memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(0)
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        out[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32) * np.float32(0.5)
    out.flush()
    del out


def _status() -> dict[str, float]:
    """VmHWM and VmPeak of this process, GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmPeak"):
            fields[key] = int(value.split()[0]) / 2**20  # kB → GiB
    return fields


def child(argv: list[str]) -> None:
    """Run ``lossfloor`` with ``argv`` here; print one JSON line of the measurements."""
    from lossfloor.cli import main

    t0 = time.perf_counter()
    try:
        rc = main(argv)
        error = None
    except MemoryError as exc:  # the in-memory path under the cap
        rc, error = 1, f"MemoryError: {exc}"
    print(json.dumps({"rc": rc, "error": error, "seconds": time.perf_counter() - t0, **_status()}))


def run_capped(argv: list[str], cap_bytes: int) -> dict:
    """``child(argv)`` in a subprocess whose RLIMIT_AS is ``cap_bytes``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        preexec_fn=limit,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"rc": proc.returncode}
    result["stderr_tail"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=350_000)
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--cap-gb", type=float, default=2.0, help="RLIMIT_AS of the children, GiB")
    ap.add_argument("--outer", type=int, default=128)
    ap.add_argument("--sigmas", default="5,20")
    ap.add_argument("--chunk-mb", type=float, default=256.0)
    ap.add_argument("--dir", default="/tmp", help="where the .npy is written")
    ap.add_argument("--keep", action="store_true", help="keep the .npy")
    ap.add_argument("--skip-memory", action="store_true", help="skip the in-memory control")
    ap.add_argument("--out", default=None, help="JSON of the results")
    args = ap.parse_args()

    path = Path(args.dir) / f"bench-stream-{args.rows}x{args.dim}.npy"
    t0 = time.perf_counter()
    if not path.exists():
        write_npy(path, args.rows, args.dim)
    write_s = time.perf_counter() - t0
    size = path.stat().st_size
    cap = int(args.cap_gb * 2**30)
    est = ["estimate", "--data", str(path), "--outer", str(args.outer), "--sigmas", args.sigmas,
           "--device", "cpu", "--quiet"]  # fmt: skip
    results: dict = {
        "rows": args.rows,
        "dim": args.dim,
        "file_gib": size / 2**30,
        "cap_gib": args.cap_gb,
        "outer": args.outer,
        "sigmas": args.sigmas,
        "chunk_mb": args.chunk_mb,
        "write_seconds": write_s,
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        if not args.skip_memory:
            results["in_memory"] = run_capped(est, cap)
        out_json = Path(args.dir) / "bench-stream-result.json"
        streamed = [*est, "--stream", "--chunk-mb", str(args.chunk_mb), "--out", str(out_json)]
        results["streamed"] = run_capped(streamed, cap)
        if out_json.exists():
            curve = json.loads(out_json.read_text())
            results["points"] = [
                {k: p[k] for k in ("sigma", "optimal_loss", "stderr", "seconds", "dtype")}
                for p in curve["points"]
            ]
            results["data_variance"] = curve["data_variance"]
            out_json.unlink()
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    print(json.dumps(results, indent=1))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
