"""Equal-compute comparison of the optimal-loss schedule (issue 9, docs/experiments/schedule.md).

Arms (same network, optimizer, data order per seed, images seen, sampler, steps and sample seeds):
  edm      EDM: target F, lognormal p (−1.2, 1.2), λ weight
  edm-w    EDM with the optimal-loss weight w = min(1/J*, w_max) (p unchanged: lognormal)
  edm-wp   EDM with the optimal-loss weight and density p ∝ w·gap, gap estimated online
  fm       flow matching (velocity target), logit-normal t
  fm-opt   flow matching with the optimal-loss weight and density (online gap)
  edm2     EDM with EDM2's learned per-σ uncertainty weighting (loss λ·L/e^u(σ) + u(σ))
and, with --arms, the variants edm-wp-tau0.1 and fm-opt-tau0.1 (σ* rule τ = 0.1) and
edm-wp-exp0.5 and fm-opt-exp0.5 (density ∝ (w·gap)^0.5).
Per run: train → 2000 samples (Heun) → classifier Fréchet distance → diagnose (gap per σ).
Every stage is a file in the run directory and is skipped when present; training resumes from
its checkpoint (bitwise). ``--phase inception`` (not part of ``all``) adds Inception FID of the
first --inception-n samples of each run. ``--phase collect`` (also run at the end) writes
results.json, results.csv and gaps.png from whatever has finished.

    setsid nohup python experiments/schedule/run.py --out experiments/schedule/runs &
    kill -TERM -- -PGID    # stops it; the same command resumes
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# J* of the 60k training images, σ ∈ [0.02, 80] (lossfloor estimate, full posterior, 10k draws)
CURVE = str(Path(__file__).resolve().parents[2] / "docs" / "results" / "fmnist-full.json")
CURVE_REL = "docs/results/fmnist-full.json"  # as recorded in results.json
DATA = "fashion-mnist"
COMMON = ["--model", "tiny", "--batch", "64", "--lr", "2e-3", "--warmup", "20",
          "--checkpoint-every", "50", "--log-every", "25"]  # fmt: skip
OPTIMAL = ["--schedule", "optimal", "--curve", CURVE]
ARMS: dict[str, list[str]] = {
    "edm": ["--process", "edm", "--target", "F", "--schedule", "edm"],
    "edm-w": ["--process", "edm", "--target", "F", *OPTIMAL, "--density", "lognormal"],
    "edm-wp": ["--process", "edm", "--target", "F", *OPTIMAL, "--gap", "online"],
    "fm": ["--process", "fm", "--target", "velocity", "--schedule", "fm-logit-normal"],
    "fm-opt": ["--process", "fm", "--target", "velocity", *OPTIMAL, "--gap", "online"],
    "edm2": ["--process", "edm", "--target", "F", "--schedule", "edm", "--uncertainty"],
    # variants (one seed): τ = 0.1 moves σ* to ≈ 2.1 and lowers the cap to ≈ 29, so high σ
    # keeps more of the weight and of the draws
    "edm-wp-tau0.1": ["--process", "edm", "--target", "F", *OPTIMAL, "--gap", "online",
                      "--star-threshold", "0.1"],
    "fm-opt-tau0.1": ["--process", "fm", "--target", "velocity", *OPTIMAL, "--gap", "online",
                      "--star-threshold", "0.1"],
    # variants (one seed): p ∝ (w·gap)^0.5 tempers the density's concentration on σ ≈ 0.5–1.2
    "edm-wp-exp0.5": ["--process", "edm", "--target", "F", *OPTIMAL, "--gap", "online",
                      "--exponent", "0.5"],
    "fm-opt-exp0.5": ["--process", "fm", "--target", "velocity", *OPTIMAL, "--gap", "online",
                      "--exponent", "0.5"],
}  # fmt: skip
MAIN_ARMS = ("edm", "edm-w", "edm-wp", "fm", "fm-opt", "edm2")
DIAG_SIGMAS = "0.02,0.05,0.1,0.2,0.5,1,2,5,10,20,80"
# the first experiment's seed-0 gaps (docs/experiments/schedule.md; its run directories are gone;
# its training is bitwise that of this code: edm-s0 and fm-s0 retrained diagnose to the same table)
PREVIOUS_GAPS = str(Path(CURVE).parent / "schedule" / "gaps-v1.json")


def _timing(run: Path, stage: str, seconds: float) -> None:
    from lossfloor.io import read_json, write_json

    path = run / "timing.json"
    timing = read_json(path) if path.exists() else {}
    write_json(path, {**timing, stage: seconds})


def _stage(lossfloor, run: Path, stage: str, failed: str, argv: list[str]) -> str | None:
    """Run ``lossfloor argv`` and record its wall time as ``{stage}_wall``; on a non-zero exit
    the run's failure line (``failed``: what to say), else None."""
    t0 = time.time()
    code = lossfloor(argv)
    if code:
        return f"{run.name}: {failed} ({code})"
    _timing(run, f"{stage}_wall", time.time() - t0)
    return None


def _trained(run: Path, steps: int) -> bool:
    import torch

    latest = run / "checkpoint-latest.pt"
    return latest.exists() and torch.load(latest, weights_only=True)["step"] >= steps


def do_run(
    arm: str, seed: int, out: str, a: argparse.Namespace, diagnose: bool, parent: int
) -> str:
    """Every missing stage of one run (in a worker process, one thread); nothing once the
    main process (``parent``) is gone, so ``kill -TERM -- -PGID`` stops the whole experiment
    (training saves a checkpoint first)."""
    import torch

    if os.getppid() != parent:
        return f"{arm}-s{seed}: skipped (the main process has stopped)"

    from lossfloor.cli import main as lossfloor

    torch.set_num_threads(1)
    run = Path(out) / f"{arm}-s{seed}"
    if not _trained(run, a.steps):
        resume = (run / "checkpoint-latest.pt").exists()
        if run.exists() and not resume:
            shutil.rmtree(run)  # started but no checkpoint yet: start again
        failure = _stage(lossfloor, run, "train", "train stopped",
                         ["train", "--data", DATA, "--run-dir", str(run), "--steps", str(a.steps),
                          "--seed", str(seed), "--device", "cpu", "--no-progress", *COMMON,
                          *ARMS[arm], *(["--resume"] if resume else [])])  # fmt: skip
        if failure:
            return failure
    samples = run / "samples.npz"
    if not samples.exists():
        failure = _stage(lossfloor, run, "sample", "sample failed",
                         ["sample", "--run", str(run), "--n", str(a.n), "--steps",
                          str(a.sample_steps), "--batch", "250", "--device", "cpu",
                          "--no-progress", "--out-npz", str(samples)])  # fmt: skip
        if failure:
            return failure
    fd = run / "fd.json"
    if not fd.exists():
        failure = _stage(lossfloor, run, "fd", "fid failed",
                         ["fid", "--samples", str(samples), "--data", DATA, "--feature",
                          "classifier", "--n-reference", str(a.n_reference), "--quiet",
                          "--out", str(fd)])  # fmt: skip
        if failure:
            return failure
    diag = run / "diagnosis.json"
    if diagnose and seed < a.diagnose_seeds and not diag.exists():
        failure = _stage(lossfloor, run, "diagnose", "diagnose failed",
                         ["diagnose", "--model", str(run), "--data", DATA, "--sigmas",
                          DIAG_SIGMAS, "--outer", str(a.outer), "--out", str(diag),
                          "--quiet"])  # fmt: skip
        if failure:
            return failure
    return f"{run.name}: done"


def inception(out: Path, jobs: list[tuple[str, int]], n: int, wait: float) -> None:
    """Inception FID (``lossfloor fid --feature inception``) of the first ``n`` samples of each
    run against ``n`` reference images (their features cached first), in the order of ``jobs``
    (seed-major), each once its samples exist: fid-inception-n{n}.json. Polls for runs still
    sampling until all are done or ``wait`` seconds pass without a new one. A run being scored
    holds a lock file, so two processes (one with --reverse) share the runs. A stopped process
    leaves its lock: delete it before restarting."""
    import torch

    from lossfloor.cli import main as lossfloor
    from lossfloor.data import load_dataset
    from lossfloor.evaluation.fid import reference_features
    from lossfloor.evaluation.inception import InceptionFeatures

    torch.set_num_threads(1)
    t0 = time.time()
    reference_features(InceptionFeatures(), load_dataset(DATA), n, progress=False)
    print(f"inception reference features of {n} images: {time.time() - t0:.0f} s", flush=True)
    todo, idle = list(jobs), time.time()
    while todo and time.time() - idle < wait:
        ready = [j for j in todo if (out / f"{j[0]}-s{j[1]}" / "samples.npz").exists()]
        if not ready:
            time.sleep(20)
            continue
        arm, seed = ready[0]
        todo.remove(ready[0])
        run = out / f"{arm}-s{seed}"
        result = run / f"fid-inception-n{n}.json"
        lock = run / f"fid-inception-n{n}.lock"  # another process is on it (see --reverse)
        if not result.exists() and not lock.exists():
            lock.touch()
            t0 = time.time()
            code = lossfloor(["fid", "--samples", str(run / "samples.npz"), "--data", DATA,
                              "--feature", "inception", "--n", str(n), "--n-reference", str(n),
                              "--device", "cpu", "--quiet", "--out", str(result)])  # fmt: skip
            _timing(run, f"inception_n{n}_wall", time.time() - t0)
            lock.unlink()
            print(f"{run.name}: inception FID ({code}) {time.time() - t0:.0f} s", flush=True)
        idle = time.time()


def _inception(run: Path) -> dict[str, float]:
    """The run's Inception FID at the largest n computed (fid-inception-n{n}.json), if any."""
    from lossfloor.io import read_json

    done = sorted(run.glob("fid-inception-n*.json"), key=lambda p: int(p.stem.rsplit("n", 1)[1]))
    if not done:
        return {}
    score = read_json(done[-1])["scores"]["inception"]
    return {"fid_inception": score["frechet_distance"], "n_inception": score["n_samples"],
            "n_inception_reference": score["n_reference"]}  # fmt: skip


def learned_u(run: Path) -> dict[str, list[float]]:
    """An --uncertainty run's learned u(σ) at the diagnosis σ, and e^u/λ(σ): the x0 loss level
    u has learnt (λ EDM's weight, σ_data 0.5)."""
    import torch

    from lossfloor.training.loss import LogVarianceNet

    state = torch.load(run / "checkpoint-latest.pt", weights_only=True)["objective"]
    net = LogVarianceNet(state["uncertainty"]["freqs"].numel())
    net.load_state_dict(state["uncertainty"])
    sigma = torch.tensor([float(s) for s in DIAG_SIGMAS.split(",")], dtype=torch.float64)
    with torch.no_grad():
        u = net(sigma).double()
    lam = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    return {"sigma": sigma.tolist(), "u": u.tolist(), "loss_x0_level": (u.exp() / lam).tolist()}


SHARE_BANDS = (0.002, 0.1, 0.5, 1.2, 3.0, 10.0, 80.0)


def loss_shares(run: Path) -> dict[str, list[float]]:
    """Where a diagnosed run's objective put its draws and its loss, per σ band: P(σ in band)
    and the band's share of E_p[w·J_θ] (J_θ from the diagnosis, linear in ln σ between its
    points, ∝ σ² below the first; the schedule as the run ended, online state included; w·e^{−u}
    with the learned u of an --uncertainty run)."""
    import numpy as np
    import torch

    from lossfloor.io import read_json
    from lossfloor.schedules import get_schedule

    sched = get_schedule(read_json(run / "config.json")["schedule"])
    state = torch.load(run / "checkpoint-latest.pt", weights_only=True).get("objective")
    if state and "schedule" in state:
        sched.load_state_dict(state["schedule"])
    points = read_json(run / "diagnosis.json")["points"]
    ds = np.log([p["sigma"] for p in points])
    jd = np.array([p["model_loss"] for p in points])
    u = np.linspace(np.log(SHARE_BANDS[0]), np.log(SHARE_BANDS[-1]), 4001)
    j = np.where(u < ds[0], jd[0] * np.exp(2 * (u - ds[0])), np.interp(u, ds, jd))
    s = torch.from_numpy(np.exp(u))
    q = sched.density_ln_sigma(s).numpy()
    c = q * sched.weight(s).numpy() * j
    if state and "uncertainty" in state:  # EDM2: the effective weight is w·e^{−u}
        from lossfloor.training.loss import LogVarianceNet

        net = LogVarianceNet(state["uncertainty"]["freqs"].numel())
        net.load_state_dict(state["uncertainty"])
        with torch.no_grad():
            c = c * torch.exp(-net(s).double()).numpy()
    draws, loss = [], []
    for lo, hi in zip(SHARE_BANDS[:-1], SHARE_BANDS[1:], strict=True):
        m = (u >= np.log(lo)) & (u < np.log(hi))
        draws.append(float(np.trapezoid(q * m, u)))
        loss.append(float(np.trapezoid(c * m, u) / np.trapezoid(c, u)))
    return {"bands": list(SHARE_BANDS), "draws": draws, "loss": loss}


def collect(out: Path) -> None:
    """results.json / results.csv (per run and per arm: mean ± std over seeds) and gaps.png."""
    import csv
    import statistics

    import numpy as np
    import torch

    from lossfloor.io import atomic_path, read_json, write_json
    from lossfloor.plots import plot_schedule, save_figure

    rows = []
    for arm in ARMS:
        for run in sorted(out.glob(f"{arm}-s*")):
            if not (run / "fd.json").exists():
                continue
            ckpt = torch.load(run / "checkpoint-latest.pt", weights_only=True)
            score = read_json(run / "fd.json")["scores"]["classifier"]
            timing = read_json(run / "timing.json") if (run / "timing.json").exists() else {}
            rows.append({"arm": arm, "seed": int(run.name.rsplit("-s", 1)[1]),
                         "images": ckpt["images"], "train_seconds": ckpt["seconds"],
                         "sample_seconds": timing.get("sample_wall"),
                         "fd_classifier": score["frechet_distance"],
                         "n_samples": score["n_samples"], "n_reference": score["n_reference"],
                         "diagnosed": (run / "diagnosis.json").exists(),
                         **_inception(run)})  # fmt: skip
            if (ckpt.get("objective") or {}).get("schedule"):  # online gap: the final density
                from lossfloor.schedules import get_schedule

                sched = get_schedule(read_json(run / "config.json")["schedule"])
                sched.load_state_dict(ckpt["objective"]["schedule"])
                plot_schedule(run / "schedule-final.png", sched.tabulated().json_fields())
    arms = {}
    for arm in ARMS:
        fds = [r["fd_classifier"] for r in rows if r["arm"] == arm]
        if fds:
            arms[arm] = {"runs": len(fds), "fd_mean": statistics.fmean(fds),
                         "fd_std": statistics.stdev(fds) if len(fds) > 1 else None,
                         "images": [r["images"] for r in rows if r["arm"] == arm][0],
                         "train_seconds_mean": statistics.fmean(
                             [r["train_seconds"] for r in rows if r["arm"] == arm])}  # fmt: skip
            fids = [r["fid_inception"] for r in rows if r["arm"] == arm and "fid_inception" in r]
            if fids:
                arms[arm].update({"fid_inception_runs": len(fids),
                                  "fid_inception_mean": statistics.fmean(fids),
                                  "fid_inception_std": statistics.stdev(fids)
                                  if len(fids) > 1 else None})  # fmt: skip
    learned = {r["arm"] + f"-s{r['seed']}": learned_u(out / f"{r['arm']}-s{r['seed']}")
               for r in rows if "--uncertainty" in ARMS[r["arm"]]}  # fmt: skip
    shares = {run.name: loss_shares(run) for run in sorted(out.glob("*-s*"))
              if (run / "diagnosis.json").exists()}  # fmt: skip
    write_json(out / "results.json", {"arms": arms, "runs": rows, "loss_shares": shares,
                                      "learned_u": learned,
                                      "options": {
        "common": COMMON, "arms": {k: [CURVE_REL if x == CURVE else x for x in v]
                              for k, v in ARMS.items()},
        "curve": CURVE_REL, "data": DATA}})  # fmt: skip
    if rows:
        with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r))  # runs may lack FID
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    # the gap per σ of every arm: mean over its diagnosed seeds, ± their std
    from matplotlib.figure import Figure

    previous = read_json(PREVIOUS_GAPS) if Path(PREVIOUS_GAPS).exists() else {"runs": {}}
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    sig = [float(s) for s in DIAG_SIGMAS.split(",")]
    for i, arm in enumerate(ARMS):
        ax = axes[0 if arm.startswith("edm") else 1]
        gaps = [
            [p["gap"] for p in read_json(run / "diagnosis.json")["points"]]
            for run in sorted(out.glob(f"{arm}-s*"))
            if (run / "diagnosis.json").exists()
        ]
        if gaps:
            g = np.array(gaps)
            std = g.std(0, ddof=1) if len(g) > 1 else np.zeros(g.shape[1])
            ax.errorbar(sig, g.mean(0), yerr=std, fmt="o-", ms=3, capsize=2, color=f"C{i}",
                        label=f"{arm} ({len(g)} seed{'s' * (len(g) > 1)})")  # fmt: skip
        if not gaps and f"{arm}-s0" in previous["runs"]:  # the first experiment's, dashed
            ax.plot(previous["sigma"], previous["runs"][f"{arm}-s0"], "x--", ms=3, lw=0.9,
                    color=f"C{i}", alpha=0.7, label=f"{arm} (seed 0, first run)")  # fmt: skip
    for ax, family in zip(axes, ("EDM", "flow matching"), strict=True):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="σ (VE)", title=f"{family} arms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("gap J_θ − J* per element (x0 units)")
    fig.suptitle("Fashion-MNIST, tiny UNet, 6,400 images: gap per σ (dashed: the first "
                 "experiment's seed-0 runs, from its table)", fontsize=10)  # fmt: skip
    save_figure(fig, out / "gaps.png")
    for name, share in shares.items():
        cells = " ".join(f"{d:.2f}/{x:.2f}" for d, x in zip(share["draws"], share["loss"],
                                                            strict=True))  # fmt: skip
        print(f"{name:10s} P(band)/share of loss per σ band {SHARE_BANDS}: {cells}")
    for arm, s in arms.items():
        std = "n/a" if s["fd_std"] is None else f"{s['fd_std']:.3f}"
        print(f"{arm:8s} runs {s['runs']}  FD {s['fd_mean']:.3f} ± {std}  "
              f"train {s['train_seconds_mean']:.0f} s")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/schedule/runs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="steps of batch 64 (100: 6,400 images)")
    p.add_argument("--n", type=int, default=2000, help="samples per run")
    p.add_argument("--sample-steps", type=int, default=5, help="Heun σ levels (2N−1 evaluations)")
    p.add_argument("--n-reference", type=int, default=10000, help="FD reference images")
    p.add_argument("--outer", type=int, default=256, help="diagnose: draws per σ")
    p.add_argument("--diagnose-seeds", type=int, default=1, help="diagnose seeds below this")
    p.add_argument("--workers", type=int, default=2)
    phases = ["all", "runs", "diagnose", "inception", "collect"]
    p.add_argument("--phase", choices=phases, default="all",
                   help="inception: Inception FID only (not part of all)")  # fmt: skip
    p.add_argument("--inception-n", type=int, default=1000, help="inception: samples and "
                   "reference images (the first N of each run's samples)")  # fmt: skip
    p.add_argument("--reverse", action="store_true",
                   help="inception: take the runs last seed first (a second process)")  # fmt: skip
    p.add_argument("--inception-wait", type=float, default=1800.0,
                   help="inception: give up after this many seconds without a new run")  # fmt: skip
    p.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"of {', '.join(ARMS)}")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    arms = a.arms.split(",")
    jobs = [(arm, seed) for seed in range(a.seeds) for arm in arms]  # seed-major: balanced
    started = time.time()
    for phase, diagnose in (("runs", False), ("diagnose", True)):
        if a.phase not in ("all", phase):
            continue
        todo = jobs
        if diagnose and jobs:  # the first diagnosis fills the J* cache the others then read
            print(do_run(*jobs[0], str(out), a, True, os.getppid()), flush=True)
            todo = jobs[1:]
        spawn = multiprocessing.get_context("spawn")  # fresh workers: no forked thread pools
        with ProcessPoolExecutor(a.workers, mp_context=spawn) as pool:
            futures = [pool.submit(do_run, arm, seed, str(out), a, diagnose, os.getpid())
                       for arm, seed in todo]  # fmt: skip
            for f in futures:
                print(f"{f.result()}  [{time.time() - started:.0f} s]", flush=True)
        collect(out)
    if a.phase == "inception":
        inception(out, jobs[::-1] if a.reverse else jobs, a.inception_n, a.inception_wait)
    if a.phase == "collect":
        collect(out)


if __name__ == "__main__":
    main()
