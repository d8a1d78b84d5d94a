"""Fingerprint every number lossfloor's commands produce on small real inputs, to show that a
restructuring changed none of them (bitwise).

    python benchmarks/fingerprint_outputs.py OUT.json            # run all, write fingerprints
    python benchmarks/fingerprint_outputs.py OUT.json --compare BEFORE.json

Each case runs one CLI command (digits; a 2-process estimate under torchrun) in a scratch
folder and hashes what it wrote: JSON with keys that are times or versions dropped, and a
result file's header "format"/"version" (floats hashed by their exact repr), CSV rows without
time columns, checkpoint tensors by their bytes, stats.jsonl without times and rates; paths in
the scratch folder read TMP. A refused command is fingerprinted by its exit code and its
one-line message. Results are compared only on one machine (float32 bits differ across CPUs).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOLATILE = (
    "seconds",
    "time",
    "elapsed",
    "per_s",
    "lossfloor_version",
    "torch_version",
    "date",
    "host",
    "provenance",
)
#: The header of a result file (``lossfloor.results``): the kind's tag and layout version, not
#: numbers; dropped at the top level so a header change leaves a result's fingerprint as it was.
HEADER = ("format", "version")
#: The scratch folder, written as TMP wherever a file names a path in it.
SCRATCH = [""]
SMALL = ["--sigmas", "0.05:20:6", "--outer", "256", "--seed", "3"]
ESTIMATORS = ["full", "stratified", "gram", "snis", "dol", "cdol"]


def canon(value, top=True):
    """JSON value with volatile keys dropped, recursively, and the result header (HEADER) at
    the top level."""
    if isinstance(value, dict):
        return {
            k: canon(v, False)
            for k, v in sorted(value.items())
            if not any(s in k for s in VOLATILE) and not (top and k in HEADER)
        }
    if isinstance(value, list):
        return [canon(v, False) for v in value]
    if isinstance(value, str) and SCRATCH[0]:
        return value.replace(SCRATCH[0], "TMP")
    return repr(value) if isinstance(value, float) else value


def digest(path: Path) -> str:
    """sha256 of a written file's numbers (see the module docstring)."""
    h = hashlib.sha256()
    if path.suffix == ".json":
        h.update(json.dumps(canon(json.loads(path.read_text())), sort_keys=True).encode())
    elif path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            h.update(json.dumps(canon(json.loads(line)), sort_keys=True).encode())
    elif path.suffix == ".pt":
        import torch

        def walk(obj, key=""):
            if isinstance(obj, torch.Tensor):
                h.update(key.encode() + obj.detach().cpu().contiguous().numpy().tobytes())
            elif isinstance(obj, dict):
                for k in sorted(obj, key=str):
                    walk(obj[k], f"{key}/{k}")
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(v, f"{key}/{i}")
            elif (isinstance(obj, (int, float, str, bool)) or obj is None) and not any(
                s in key for s in VOLATILE
            ):
                h.update(f"{key}={obj!r}".encode())

        walk(torch.load(path, map_location="cpu", weights_only=False))
    elif path.suffix == ".csv":
        rows = list(csv.reader(path.read_text().splitlines()))
        keep = [i for i, c in enumerate(rows[0]) if not any(s in c for s in VOLATILE)]
        for row in rows:
            h.update(repr([row[i] for i in keep if i < len(row)]).encode())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cases(tmp: Path) -> dict[str, list[str]]:
    """name → argv (after ``python -m lossfloor`` or torchrun); outputs land in tmp/name."""
    c: dict[str, list[str]] = {
        "demo": [
            "estimate",
            "--data",
            "digits",
            "--sigmas",
            "0.02:50:20",
            "--estimator",
            "full",
            "--total",
            "edm",
        ],
    }
    for est in ESTIMATORS:
        for draws in ("plain", "tilted"):
            c[f"{est}-{draws}"] = [
                "estimate",
                "--data",
                "digits",
                *SMALL,
                "--estimator",
                est,
                "--draws",
                draws,
            ]
    c["full-conditional"] = ["estimate", "--data", "digits", *SMALL, "--conditional"]
    c["full-xflip"] = ["estimate", "--data", "digits", *SMALL, "--xflip"]
    c["stratified-conditional"] = [
        "estimate",
        "--data",
        "digits",
        *SMALL,
        "--conditional",
        "--estimator",
        "stratified",
    ]
    c["gram-xflip"] = ["estimate", "--data", "digits", *SMALL, "--xflip", "--estimator", "gram"]
    for draws in ("plain", "tilted"):  # gram's compiled pass (its own numbers: to rounding)
        c[f"gram-fused-{draws}"] = ["estimate", "--data", "digits", *SMALL, "--estimator",
                                    "gram", "--fused", "--draws", draws]  # fmt: skip
    c["full-adaptive"] = [
        "estimate",
        "--data",
        "digits",
        "--sigmas",
        "0.1:10:4",
        "--target-rse",
        "0.05",
        "--max-outer",
        "8192",
    ]
    c["full-heldout"] = [
        "estimate",
        "--data",
        str(tmp / "train.npz"),
        "--sources",
        str(tmp / "heldout.npz"),
        *SMALL,
        "--bandwidth",
        "auto",
    ]
    c["full-float64"] = ["estimate", "--data", "digits", *SMALL, "--dtype", "float64"]
    for est in ("full", "cdol"):
        c[f"{est}-stream"] = [
            "estimate",
            "--data",
            str(tmp / "train.npy"),
            *SMALL,
            "--stream",
            "--chunk-mb",
            "0.5",
            "--estimator",
            est,
        ]
        c[f"{est}-2proc"] = ["torchrun", "estimate", "--data", "digits", *SMALL, "--estimator", est]
    c["train"] = [
        "train",
        "--data",
        "digits",
        "--run-dir",
        str(tmp / "run"),
        "--steps",
        "12",
        "--batch",
        "16",
        "--model",
        "tiny",
        "--log-every",
        "4",
        "--checkpoint-every",
        "6",
        "--snapshot-every",
        "6",
        "--no-progress",
        "--device",
        "cpu",
    ]
    c["diagnose"] = [
        "diagnose",
        "--model",
        str(tmp / "run"),
        "--data",
        "digits",
        "--sigmas",
        "0.1:10:4",
        "--outer",
        "128",
        "--no-cache",
        "--device",
        "cpu",
    ]
    c["diagnose-tilted"] = [*c["diagnose"], "--draws", "tilted"]
    c["floor"] = [
        "floor",
        "--data",
        str(tmp / "train.npz"),
        "--heldout",
        str(tmp / "heldout.npz"),
        "--sigmas",
        "0.1:10:4",
        "--levels",
        "3",
        "--repeats",
        "2",
        "--outer",
        "128",
        "--device",
        "cpu",
    ]
    c["schedule"] = [
        "schedule",
        "--curve",
        str(tmp / "full-plain" / "out.json"),
        "--gap",
        str(tmp / "diagnose" / "out.json"),
    ]
    c["train-optimal"] = [
        "train",
        "--data",
        "digits",
        "--run-dir",
        str(tmp / "run-opt"),
        "--steps",
        "8",
        "--batch",
        "16",
        "--model",
        "tiny",
        "--log-every",
        "4",
        "--schedule",
        "optimal",
        "--curve",
        str(tmp / "full-plain" / "out.json"),
        "--gap",
        "online",
        "--sigma-min",
        "0.05",
        "--sigma-max",
        "20",
        "--no-progress",
        "--device",
        "cpu",
    ]
    return c  # fmt: skip


def free_port() -> int:
    """A TCP port free now (several checks may run at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(name: str, argv: list[str], tmp: Path) -> dict[str, str]:
    out = tmp / name
    out.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "LOSSFLOOR_CACHE": str(tmp / "cache"),
        "OMP_NUM_THREADS": "2",
    }
    if argv[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "lossfloor", *argv[1:]]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "lossfloor", *argv]
    command = argv[1] if argv[0] == "torchrun" else argv[0]
    if command in ("estimate", "diagnose", "floor", "schedule"):
        cmd += ["--out", str(out / "out.json")] + (["--quiet"] if command != "schedule" else [])
    if command in ("estimate", "diagnose"):
        cmd += ["--csv", str(out / "out.csv")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    result = {"rc": str(p.returncode)}
    if p.returncode:
        result["error"] = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    for f in sorted(out.rglob("*")) if argv[0] != "train" else []:
        if f.is_file() and not f.name.endswith(".partial"):
            result[f.name] = digest(f)
    if argv[0] == "train" and not p.returncode:
        run = Path(argv[argv.index("--run-dir") + 1])
        for f in sorted(run.iterdir()):
            if f.suffix in (".pt", ".jsonl"):
                result[f.name] = digest(f)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--compare", help="fingerprints from before; exit 1 on any difference")
    ap.add_argument("--only", help="comma-separated case names")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        SCRATCH[0] = str(tmp)
        from sklearn.datasets import load_digits

        x = load_digits().data.astype(np.float32) / 8.0 - 1.0
        y = load_digits().target
        np.savez(tmp / "train.npz", x=x[:1200].reshape(-1, 1, 8, 8), y=y[:1200])
        np.save(tmp / "train.npy", x[:1200].reshape(-1, 1, 8, 8))
        np.savez(tmp / "heldout.npz", x=x[1200:].reshape(-1, 1, 8, 8), y=y[1200:])
        todo = cases(tmp)
        if args.only:
            todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
        found = {}
        for name, argv in todo.items():
            found[name] = run_case(name, argv, tmp)
            print(name, found[name], flush=True)
    Path(args.out).write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diff = [k for k in found if before.get(k) != found[k]]
        print("differ:", diff or "none")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
