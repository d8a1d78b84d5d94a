"""cDOL accuracy against cost on Fashion-MNIST (the paper's Fig. 1), and the two inner layouts.

For L ∈ {N/1000, N/100, N/10} and C ∈ {1 (DOL), (N−1)/(L−1), 4N/L (paper), 16N/L, ∞ (SNIS on
L−1)}, the error of both outer forms against the full estimate on the same outer draws, and the
time. Then shared against independent random inner sets (time and error), and a figure.

Usage: python benchmarks/bench_cdol.py [--outer 4096] [--out docs/bench_cdol.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from common import machine
from matplotlib.figure import Figure

from lossfloor.data import load_dataset
from lossfloor.io import write_json
from lossfloor.optimal import estimate_curve, make_estimator
from lossfloor.plots import save_figure

SIGMAS = [0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]


def run(x, est, outer, sigmas=SIGMAS, precision="auto"):
    t0 = time.perf_counter()
    c = estimate_curve(x, sigmas, est, outer=outer, seed=0, progress=False, precision=precision)
    pts = c.points
    return {
        "closed": np.array([p.closed for p in pts]),
        "closed_stderr": np.array([p.closed_stderr for p in pts]),
        "direct": np.array([p.direct for p in pts]),
        "direct_stderr": np.array([p.direct_stderr for p in pts]),
        "value": c.values,
        "stderr": c.stderrs,
        "seconds": time.perf_counter() - t0,
    }


def rel(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    """(a − b)/b, None where b = 0 (J* below float resolution)."""
    return [float((x - y) / y) if y > 0 else None for x, y in zip(a, b, strict=True)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outer", type=int, default=4096)
    ap.add_argument("--out", default="docs/bench_cdol.json")
    ap.add_argument("--figure", default="docs/fig_estimators_fmnist.png")
    args = ap.parse_args()
    ds = load_dataset("fashion-mnist")
    n, x, m = ds.n, ds.x, args.outer
    result: dict = {"machine": machine(), "dataset": ds.describe(), "outer": m, "sigmas": SIGMAS}
    full = run(x, make_estimator("full", n), m)
    result["full"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in full.items()}
    print(f"full: {full['seconds']:.1f}s", file=sys.stderr)
    rows, curves = [], {}
    best = full["value"]
    var = float(ds.x.var(dim=0, unbiased=False).mean())
    result["data_variance"] = var
    for inner in (n // 1000, n // 100, n // 10):
        for c_name, c in (
            ("1 (DOL)", 1.0),
            ("(N-1)/(L-1)", (n - 1) / (inner - 1)),
            ("4N/L (paper)", 4 * n / inner),
            ("16N/L", 16 * n / inner),
            ("inf (SNIS)", math.inf),
        ):
            r = run(x, make_estimator("cdol", n, inner=inner, C=c), m)
            rows.append(
                {
                    "inner": inner,
                    "C": c_name,
                    "C_value": c if math.isfinite(c) else "inf",
                    "seconds": r["seconds"],
                    "speedup_vs_full": full["seconds"] / r["seconds"],
                    # against the full estimate's own form on the same draws: the inner error
                    "closed_rel_error": rel(r["closed"], full["closed"]),
                    "direct_rel_error": rel(r["direct"], full["direct"]),
                    # against the full estimate's best value, in units of the data variance
                    "closed_error_over_variance": [float(v) for v in (r["closed"] - best) / var],
                    "direct_error_over_variance": [float(v) for v in (r["direct"] - best) / var],
                }
            )
            curves[(inner, c_name)] = r
            print(f"L={inner} C={c_name}: {r['seconds']:.1f}s", file=sys.stderr)
    result["sweep"] = rows

    # shared vs independent inner sets, L = N/100, paper C, three σ
    sig3 = [0.5, 2.0, 10.0]
    ref3 = run(x, make_estimator("full", n), m, sig3)
    layouts = []
    for layout in ("shared", "independent"):
        est = make_estimator("cdol", n, inner=n // 100, layout=layout)
        r = run(x, est, m, sig3)
        layouts.append(
            {
                "layout": layout,
                "seconds": r["seconds"],
                "closed_rel_error": rel(r["closed"], ref3["closed"]),
                "closed_stderr": r["closed_stderr"].tolist(),
            }
        )
        print(f"layout {layout}: {r['seconds']:.1f}s", file=sys.stderr)
    result["layouts"] = layouts

    # the float64 spot check: 10,000 images, σ = 3, L = 1,000, C = 4N/L
    x10 = x[:10000]
    f10 = run(x10, make_estimator("full", 10000), 10000, [3.0], "float64")
    c10 = run(x10, make_estimator("cdol", 10000, inner=1000), 10000, [3.0], "float64")
    result["spot_check_10k_sigma3"] = {
        "full": float(f10["value"][0]),
        "cdol_closed_rel_error": rel(c10["closed"], f10["closed"])[0],
        "cdol_direct_rel_error": rel(c10["direct"], f10["direct"])[0],
    }
    write_json(args.out, result)
    figure(args.figure, full, curves, n // 100, ds)
    return 0


def figure(path, full, curves, inner, ds) -> None:
    fig = Figure(figsize=(11, 4.2))
    a, b = fig.subplots(1, 2)
    s = np.array(SIGMAS)
    a.plot(s, np.maximum(full["closed"], 1e-8), "k-o", ms=3, label="full (exact posterior)")
    for c_name, style in (("1 (DOL)", "--"), ("4N/L (paper)", "-"), ("inf (SNIS)", ":")):
        r = curves[(inner, c_name)]
        a.plot(s, np.maximum(r["closed"], 1e-8), style, marker=".", label=f"C={c_name}")
        b.plot(s, (r["closed"] - full["closed"]) / full["value"], style, marker=".", label=c_name)
    a.set(xscale="log", yscale="log", xlabel="σ", ylabel="J*(σ) per element",
          title=f"Fashion-MNIST (N={ds.n}), L={inner}, form A−‖μ̂‖²")  # fmt: skip
    b.set(xscale="log", xlabel="σ", ylabel="relative error vs full", title="error of cDOL family")
    b.set_ylim(-1.05, 2)
    b.set_xlim(0.5, 60)
    b.axhline(0, color="gray", lw=0.8)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
