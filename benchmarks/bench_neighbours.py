"""Neighbour-aware estimation (issue 8): the stratified inner estimator against full and the
paper's sub-sampled estimators on Fashion-MNIST, and the tilted outer draws in the rare-event
regime against exact values.

    python benchmarks/bench_neighbours.py fmnist [--limit N] [--outer 4096] [--out FILE]
    python benchmarks/bench_neighbours.py rare [--seeds 200] [--outer 8000] [--first-seed 0]
        [--draws tilted,plain] [--out FILE]
    python benchmarks/bench_neighbours.py adaptive [--seeds 30] [--target 0.02] [--pilot 2048]
    python benchmarks/bench_neighbours.py ratio [--rounds 3] [--outer 2048] [--out FILE]
    python benchmarks/bench_neighbours.py speedup [--sizes 2000,5000,20000,60000] [--grids 8,32]
        [--threads 1,2] [--outer 1024] [--skip 60000x32x1] [--out FILE]

``fmnist``: 32 σ from 0.2 to 80, each estimator with its default options: full and then
stratified on the same (tilted) outer draws, so only the inner estimator differs (the
neighbour index built inside the timed run, in an empty cache); then DOL, SNIS and cDOL
(C = 4N/L and 16N/L) with L = the stratified estimator's far + near sizes, on their default
plain draws and closed form (their error includes the outer noise: see full's stderrs).
Error = (estimate − full)/full per σ.

``rare``: the issue's two points in 16 dims and 5 points on a line with gaps 1, 0.5, 2, 0.5
(8 dims); for each seed the default ``estimate`` (tilted draws) and plain draws; coverage of
the 95% interval, relative errors, and the variance across seeds (plain/tilted: the variance
reduction), at every σ with J* ≥ 1e-8 of the data variance.

``adaptive``: ``--target-rse`` (issue 8 item 5) on the same sets (counted σ only), full, over
seeds: the draws each σ chose, the achieved stderr/J*, and the true error; and stratified on
the digits against full with M = 4N.

``speedup``: where gram is faster than full (issue 27 item 14): both on the same plain draws
(M fixed) of the first N Fashion-MNIST images, the CLI's default σ range 0.01–100 with S
points, T torch threads; the process CPU time (``time.process_time``, all threads: the primary
number on a shared machine) and the wall time of each, and gram's largest relative difference
from full where J* > 1e-3 of the variance.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from common import import_torch_seconds, machine

from lossfloor.data import load_dataset
from lossfloor.io import read_json, write_json
from lossfloor.optimal import Curve, estimate_curve, fused, make_estimator
from lossfloor.optimal.analytic import line_optimal_loss, two_point_optimal_loss

FMNIST_SIGMAS = np.geomspace(0.2, 80, 32).tolist()


def timed(x, sigmas, est, outer, **kw):
    t0 = time.perf_counter()
    curve = estimate_curve(x, sigmas, est, outer=outer, seed=0, progress=False, **kw)
    return curve, time.perf_counter() - t0


def relative_errors(values, ref, variance: float) -> tuple[list, float]:
    """(estimate − reference)/reference per σ (None where the reference is 0), and its largest
    magnitude where the reference J* exceeds 1e-3 of the data variance (the issue's target)."""
    rel = [(v - r) / r if r > 0 else None for v, r in zip(values, ref, strict=True)]
    return rel, max(abs(e) for e, r in zip(rel, ref, strict=True) if r > 1e-3 * variance)


def fmnist(args) -> dict:
    ds = load_dataset("fashion-mnist", limit=args.limit)
    n, x, m, sigmas = ds.n, ds.x, args.outer, FMNIST_SIGMAS
    out: dict = {"machine": machine(), "dataset": ds.describe(), "outer": m, "sigmas": sigmas}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LOSSFLOOR_CACHE"] = cache  # the index is built inside the timed run
        full, t_full = timed(x, sigmas, make_estimator("full", n), m)
        print(f"full {t_full:.1f}s", file=sys.stderr)
        strat_est = make_estimator("stratified", n, inner=args.inner, near=args.near)
        strat, t_strat = timed(x, sigmas, strat_est, m)
        print(f"stratified {t_strat:.1f}s", file=sys.stderr)
        big = strat_est.inner + strat_est.near
        runs = {"full": (full, t_full), "stratified": (strat, t_strat)}
        others = [("dol", "dol", None), ("snis", "snis", None),
                  ("cdol 4N/L", "cdol", "paper"), ("cdol 16N/L", "cdol", 16 * n / big)]  # fmt: skip
        for label, name, c in others:
            est = make_estimator(name, n, inner=big, C=c)
            runs[label] = timed(x, sigmas, est, m)  # as users run them: plain draws, closed form
            print(f"{label} {runs[label][1]:.1f}s", file=sys.stderr)
    ref = full.values
    out["full"] = {"values": ref.tolist(), "stderrs": full.stderrs.tolist(), "seconds": t_full}
    out["data_variance"] = full.data_variance
    out["estimators"] = {}
    for label, (curve, secs) in runs.items():
        rel, worst = relative_errors(curve.values, ref, full.data_variance)
        out["estimators"][label] = {
            "config": curve.estimator,
            "form": curve.form,
            "seconds": secs,
            "time_ratio": secs / t_full,
            "values": curve.values.tolist(),
            "stderrs": curve.stderrs.tolist(),
            "rel_error": rel,
            "max_abs_rel_error_where_J_above_1e-3_var": worst,
        }
        print(f"{label:12s} {secs:7.1f}s ratio {secs / t_full:.3f} max|rel| {worst:.4f}",
              file=sys.stderr)  # fmt: skip
    return out


#: ``grid``: (label, estimator name, parameters, draws) in the order they run; full on plain
#: draws first (the reference of everything on plain draws), full as users run it (tilted,
#: index built in the timed run) the reference of stratified, which shares its draws.
GRID_RUNS = [
    ("full (plain)", "full", {}, "plain"),
    ("gram", "gram", {}, "plain"),
    ("gram (fused)", "gram", {"fused": True}, "plain"),
    ("full (default: tilted)", "full", {}, "tilted"),
    ("gram (tilted)", "gram", {}, "tilted"),
    ("gram (fused, tilted)", "gram", {"fused": True}, "tilted"),
    ("stratified", "stratified", {}, "tilted"),
    ("dol", "dol", {}, "plain"),
    ("snis", "snis", {}, "plain"),
    ("cdol 4N/L", "cdol", {"C": "paper"}, "plain"),
    ("cdol 16N/L", "cdol", {"C": "16N/L"}, "plain"),
]


def grid(args) -> dict:
    """All estimators on one σ grid of the whole of Fashion-MNIST, each at its default sizes
    (snis, dol, cdol at L = N/10, about gram's time); each run's curve and wall time is saved
    to ``--stages`` as it finishes, so an interrupted run resumes with the next estimator."""
    ds = load_dataset("fashion-mnist", limit=args.limit)
    n, x, m, sigmas = ds.n, ds.x, args.outer, FMNIST_SIGMAS
    stages = read_json(args.stages) if os.path.exists(args.stages) else {}
    key = f"{ds.describe()['sha256']}|{m}|{len(sigmas)}"
    if stages.get("key") != key:
        stages = {"key": key, "runs": {}}
    timed(x[:256], sigmas[:2], make_estimator("full", 256), 256)  # warm-up: first calls, pages
    with tempfile.TemporaryDirectory() as cache:  # gram --fused: its kernel compiled cold
        os.environ["LOSSFLOOR_CACHE"] = cache
        timed(x[:256], sigmas[:2], make_estimator("gram", 256, fused=True), 256)
        stages.setdefault("fused_compile_seconds", fused.compile_seconds())
    for label, name, params, draws in GRID_RUNS:
        if label in stages["runs"]:
            continue
        c = params.get("C")
        c = 16 * n / max(2, n // 10) if c == "16N/L" else c
        est = make_estimator(name, n, **({"C": c} if c is not None else params))
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LOSSFLOOR_CACHE"] = cache  # an index is built inside the timed run
            curve, secs = timed(x, sigmas, est, m, draws=draws)
        stages["runs"][label] = {"seconds": secs, "curve": curve.to_json(), "load": machine()}
        write_json(args.stages, stages)
        print(f"{label:24s} {secs:7.1f}s", file=sys.stderr)
    runs = {k: (Curve.from_json(v["curve"]), v["seconds"]) for k, v in stages["runs"].items()}
    plain, t_plain = runs["full (plain)"]
    tilted, t_tilted = runs["full (default: tilted)"]
    var = plain.data_variance
    out: dict = {"machine": machine(), "dataset": ds.describe(), "outer": m, "sigmas": sigmas,
                 "data_variance": var, "estimators": {},
                 "fused_compile_seconds": stages.get("fused_compile_seconds"),
                 "import_torch_seconds": import_torch_seconds()}  # fmt: skip
    for label, _, _, draws in GRID_RUNS:
        curve, secs = runs[label]
        ref = tilted if draws == "tilted" else plain
        rel, worst = relative_errors(curve.values, ref.values, var)
        rse = [s / v if v > 0 else None for v, s in zip(curve.values, curve.stderrs, strict=True)]
        out["estimators"][label] = {
            "config": curve.estimator,
            "draws": draws,
            "reference": "full (default: tilted)" if draws == "tilted" else "full (plain)",
            "seconds": secs,
            "time_vs_full_plain": secs / t_plain,
            "time_vs_full_default": secs / t_tilted,
            "values": curve.values.tolist(),
            "stderrs": curve.stderrs.tolist(),
            "rel_error": rel,
            "max_abs_rel_error_where_J_above_1e-3_var": worst,
            "outer_for_1pct_over_N": [None if r is None else m * (r / 0.01) ** 2 / n for r in rse],
        }
        print(f"{label:24s} {secs:7.1f}s ÷full(plain) {secs / t_plain:.3f} "
              f"÷full(default) {secs / t_tilted:.3f} "
              f"max|rel| {worst:.4f}", file=sys.stderr)  # fmt: skip
    return out


def speedup(args) -> dict:
    """gram against full per (N, S, T) (module docstring); each pair is saved to ``--stages``
    as it finishes, so an interrupted run resumes with the next one. ``--skip NxSxT`` leaves
    combinations out (nothing is extrapolated to them)."""
    stages = read_json(args.stages) if os.path.exists(args.stages) else {}
    if stages.get("outer") != args.outer:
        stages = {"outer": args.outer, "runs": {}}
    skip = set(args.skip.split(",")) if args.skip else set()
    sizes = [int(v) for v in args.sizes.split(",")]
    x_all = load_dataset("fashion-mnist", limit=max(sizes)).x
    threads = torch.get_num_threads()
    try:
        for n in sizes:
            x = x_all[:n]
            for s in (int(v) for v in args.grids.split(",")):
                sigmas = np.geomspace(0.01, 100, s).tolist()
                for t in (int(v) for v in args.threads.split(",")):
                    key = f"{n}x{s}x{t}"
                    if key in stages["runs"] or key in skip:
                        continue
                    torch.set_num_threads(t)
                    run: dict = {"n": n, "grid": s, "threads": t, "load_before": machine()}
                    for name in ("full", "gram"):
                        est = make_estimator(name, n)
                        timed(x[:256], sigmas[:2], make_estimator(name, 256), 256, draws="plain")
                        cpu = time.process_time()
                        curve, secs = timed(x, sigmas, est, args.outer, draws="plain")
                        run[name] = {"wall_s": secs, "cpu_s": time.process_time() - cpu,
                                     "values": curve.values.tolist()}  # fmt: skip
                    run["data_variance"] = curve.data_variance  # the data's: the same for both
                    run["max_abs_rel_diff_where_J_above_1e-3_var"] = relative_errors(
                        run["gram"]["values"], run["full"]["values"], run["data_variance"]
                    )[1]
                    run["load_after"] = os.getloadavg()[0]
                    stages["runs"][key] = run
                    write_json(args.stages, stages)
                    f, g = run["full"], run["gram"]
                    print(f"{key:14s} full {f['cpu_s']:6.1f} cpu-s {f['wall_s']:6.1f} s | gram "
                          f"{g['cpu_s']:6.1f} cpu-s {g['wall_s']:6.1f} s | cpu ratio "
                          f"{g['cpu_s'] / f['cpu_s']:.3f}", file=sys.stderr)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    table = []
    for key, run in stages["runs"].items():
        f, g = run["full"], run["gram"]
        table.append({"n": run["n"], "grid": run["grid"], "threads": run["threads"],
                      "full_cpu_s": f["cpu_s"], "gram_cpu_s": g["cpu_s"],
                      "full_wall_s": f["wall_s"], "gram_wall_s": g["wall_s"],
                      "cpu_ratio": g["cpu_s"] / f["cpu_s"], "wall_ratio": g["wall_s"] / f["wall_s"],
                      "max_abs_rel_diff": run["max_abs_rel_diff_where_J_above_1e-3_var"],
                      "load_before": run["load_before"]["load_average"],
                      "load_after": run["load_after"], "key": key})  # fmt: skip
    return {"machine": machine(), "outer": args.outer, "sigma_range": [0.01, 100],
            "table": table, "runs": stages["runs"]}  # fmt: skip


def rare_sets() -> dict[str, tuple[torch.Tensor, list[float], list[float]]]:
    """name → (data, σ grid, exact J* per σ)."""
    r, dim = 2.2128884383056144, 16
    a = torch.full((dim,), r / math.sqrt(dim), dtype=torch.float64)
    two_sigmas = [0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 2.0, 5.0]
    t = np.array([0.0, 1.0, 1.5, 3.5, 4.0])
    line = torch.from_numpy(t)[:, None] * torch.ones(8, dtype=torch.float64) / math.sqrt(8)
    line_sigmas = [0.03, 0.04, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0, 3.0]
    return {
        "two-point": (torch.stack([a, -a]), two_sigmas,
                      [two_point_optimal_loss(r, dim, s) for s in two_sigmas]),
        "line": (line, line_sigmas, [line_optimal_loss(t, 8, s) for s in line_sigmas]),
    }  # fmt: skip


def rare(args) -> dict:
    out: dict = {"machine": machine(), "seeds": args.seeds, "first_seed": args.first_seed,
                 "outer": args.outer, "estimator": args.estimator, "sets": {}}  # fmt: skip
    for name, (data, sigmas, exact) in rare_sets().items():
        exact = np.array(exact)
        est = make_estimator(args.estimator, data.shape[0])
        var = float(((data - data.mean(0)) ** 2).sum(1).mean() / data.shape[1])
        res: dict = {"sigmas": sigmas, "exact": exact.tolist(), "data_variance": var}
        for draws in args.draws.split(","):
            t0 = time.perf_counter()
            vals, ses, ess, unresolved = [], [], [], []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                c = estimate_curve(data, sigmas, est, outer=args.outer, seed=seed, draws=draws,
                                   progress=False)  # fmt: skip
                vals.append(c.values)
                ses.append(c.stderrs)
                ess.append([p.ess for p in c.points])
                unresolved.append([not p.resolved for p in c.points])
            vals, ses = np.array(vals), np.array(ses)
            z = (vals - exact) / np.where(ses > 0, ses, np.inf)
            rel = vals / np.where(exact > 0, exact, np.nan) - 1
            res[draws] = {
                "coverage_95": (np.abs(z) < 1.96).mean(0).tolist(),
                "mean_z": z.mean(0).tolist(),
                "median_abs_rel_error": np.nanmedian(np.abs(rel), 0).tolist(),
                "p90_abs_rel_error": np.nanpercentile(np.abs(rel), 90, 0).tolist(),
                "max_abs_rel_error": np.nanmax(np.abs(rel), 0).tolist(),
                "variance_across_seeds": vals.var(0).tolist(),
                "mean_ess": np.mean(ess, 0).tolist(),
                "unresolved_share": np.mean(unresolved, 0).tolist(),
                "seconds": time.perf_counter() - t0,
            }
            print(f"{name} {draws}: {res[draws]['seconds']:.0f}s", file=sys.stderr)
        if {"plain", "tilted"} <= set(res):
            res["variance_reduction"] = (
                np.array(res["plain"]["variance_across_seeds"])
                / np.array(res["tilted"]["variance_across_seeds"])
            ).tolist()
        res["counted"] = (exact >= 1e-8 * var).tolist()
        out["sets"][name] = res
    return out


def adaptive(args) -> dict:
    """--target-rse on the rare-event sets (full, exact references) over seeds, and stratified on
    the digits against full (M = 4N) on one seed: per σ the draws (and far sample) chosen, the
    achieved stderr/J*, and the true error."""
    target = args.target
    out: dict = {"machine": machine(), "target_rse": target, "seeds": args.seeds,
                 "pilot": args.pilot, "sets": {}}  # fmt: skip
    for name, (data, sigmas, exact) in rare_sets().items():
        exact = np.array(exact)
        var = float(((data - data.mean(0)) ** 2).sum(1).mean() / data.shape[1])
        keep = exact >= 1e-8 * var
        sigmas, exact = [s for s, k in zip(sigmas, keep, strict=True) if k], exact[keep]
        est = make_estimator("full", data.shape[0])
        t0 = time.perf_counter()
        vals, ses, ms = [], [], []
        for seed in range(args.seeds):
            c = estimate_curve(data, sigmas, est, outer=args.pilot, seed=seed, target_rse=target,
                               progress=False)  # fmt: skip
            vals.append(c.values)
            ses.append(c.stderrs)
            ms.append([p.outer for p in c.points])
        vals, ses, ms = np.array(vals), np.array(ses), np.array(ms)
        rel = vals / exact - 1
        out["sets"][name] = {
            "sigmas": sigmas,
            "exact": exact.tolist(),
            "median_outer": np.median(ms, 0).tolist(),
            "max_outer": ms.max(0).tolist(),
            "mean_achieved_rse": (ses / vals).mean(0).tolist(),
            "rms_true_rel_error": np.sqrt((rel**2).mean(0)).tolist(),
            "coverage_95": (np.abs(vals - exact) < 1.96 * ses).mean(0).tolist(),
            "seconds": time.perf_counter() - t0,
        }
        print(f"{name}: {out['sets'][name]['seconds']:.0f}s", file=sys.stderr)
    ds = load_dataset("digits")
    sigmas = np.geomspace(0.2, 20, 12).tolist()
    ref, t_ref = timed(ds.x, sigmas, make_estimator("full", ds.n), 4 * ds.n)
    strat, t_strat = timed(ds.x, sigmas, make_estimator("stratified", ds.n), args.pilot,
                           target_rse=target)  # fmt: skip
    out["digits"] = {
        "n": ds.n,
        "sigmas": sigmas,
        "full_M4N": {
            "values": ref.values.tolist(),
            "stderrs": ref.stderrs.tolist(),
            "seconds": t_ref,
        },  # fmt: skip
        "stratified": {
            "values": strat.values.tolist(),
            "outer": [p.outer for p in strat.points],
            "inner": [p.inner for p in strat.points],
            "achieved_rse": [p.rse for p in strat.points],
            "rel_error_vs_full": (strat.values / ref.values - 1).tolist(),
            "seconds": t_strat,
        },
    }
    return out


def ratio(args) -> dict:
    """gram --fused against full on the same plain draws of all of Fashion-MNIST (32 σ),
    alternately for ``--rounds`` rounds in one process: the time ratio per round (wall and
    process CPU time), so a slower or faster spell of a shared machine meets both."""
    ds = load_dataset("fashion-mnist", limit=args.limit)
    sigmas, m = FMNIST_SIGMAS, args.outer
    timed(ds.x[:256], sigmas[:2], make_estimator("gram", 256, fused=True), 256)  # warm-up
    timed(ds.x[:256], sigmas[:2], make_estimator("full", 256), 256)
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for label, est in [("full", make_estimator("full", ds.n)),
                           ("gram_fused", make_estimator("gram", ds.n, fused=True))]:  # fmt: skip
            cpu = time.process_time()
            curve, secs = timed(ds.x, sigmas, est, m, draws="plain")
            row[label] = {"seconds": secs, "cpu_seconds": time.process_time() - cpu,
                          "values": curve.values.tolist()}  # fmt: skip
        _, worst = relative_errors(
            np.array(row["gram_fused"]["values"]), np.array(row["full"]["values"]),
            curve.data_variance,
        )  # fmt: skip
        row["ratio"] = row["gram_fused"]["seconds"] / row["full"]["seconds"]
        row["cpu_ratio"] = row["gram_fused"]["cpu_seconds"] / row["full"]["cpu_seconds"]
        row["max_abs_rel_error_where_J_above_1e-3_var"] = worst
        row["load_average"] = os.getloadavg()[0]
        rounds.append(row)
        print(
            f"full {row['full']['seconds']:.1f}s gram --fused {row['gram_fused']['seconds']:.2f}s"
            f" ratio {row['ratio']:.4f} (CPU {row['cpu_ratio']:.4f})",
            file=sys.stderr,
        )
    ratios = sorted(r["ratio"] for r in rounds)
    return {"machine": machine(), "import_torch_seconds": import_torch_seconds(), "outer": m,
            "sigmas": sigmas, "rounds": rounds,
            "median_ratio": ratios[len(ratios) // 2]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fmnist")
    f.add_argument("--limit", type=int, default=None)
    f.add_argument("--outer", type=int, default=4096)
    f.add_argument("--inner", type=int, default=None)
    f.add_argument("--near", type=int, default=None)
    f.add_argument("--out", default="docs/results/bench_neighbours_fmnist.json")
    r = sub.add_parser("rare")
    r.add_argument("--seeds", type=int, default=200)
    r.add_argument("--outer", type=int, default=8000)
    r.add_argument("--first-seed", type=int, default=0)
    r.add_argument("--draws", default="tilted,plain")
    r.add_argument("--estimator", default="full", help="full, or gram (its grid sweep)")
    r.add_argument("--out", default="docs/results/bench_neighbours_rare.json")
    g = sub.add_parser("grid")
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--outer", type=int, default=2048)
    g.add_argument("--stages", default="benchmarks/runs/grid_stages.json")
    g.add_argument("--out", default="docs/results/bench_neighbours_grid.json")
    q = sub.add_parser("ratio")
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--outer", type=int, default=2048)
    q.add_argument("--rounds", type=int, default=3)
    q.add_argument("--out", default="docs/results/bench_gram_fused_ratio.json")
    a = sub.add_parser("adaptive")
    a.add_argument("--seeds", type=int, default=30)
    a.add_argument("--target", type=float, default=0.02)
    a.add_argument("--pilot", type=int, default=2048)
    a.add_argument("--out", default="docs/results/bench_neighbours_adaptive.json")
    sp = sub.add_parser("speedup")
    sp.add_argument("--sizes", default="2000,5000,20000,60000")
    sp.add_argument("--grids", default="8,32")
    sp.add_argument("--threads", default="1,2")
    sp.add_argument("--outer", type=int, default=1024)
    sp.add_argument("--skip", default="", help="NxSxT,… combinations to leave out")
    sp.add_argument("--stages", default="benchmarks/runs/speedup_stages.json")
    sp.add_argument("--out", default="docs/results/bench_gram_speedup.json")
    args = ap.parse_args()
    modes = {"fmnist": fmnist, "rare": rare, "adaptive": adaptive, "grid": grid,
             "speedup": speedup, "ratio": ratio}  # fmt: skip
    result = modes[args.what](args)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
