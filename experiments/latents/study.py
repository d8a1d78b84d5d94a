"""The latent study (issue 23, docs/latents.md): J*(σ) of Fashion-MNIST's VAE latents (a) as the
Gaussian mixture they are (posterior mean and std per image), (b) as points (the means) and
(c) as points (one sampled latent m + s·z per image), on the same items, σ grid and draws; a
UNet trained on the latents (x0 = m + s·z at every step) diagnosed against (a), the right
curve, and against (b), what a user who drops the std would compare with.

All latents are in one unit, EDM2's normalisation: per channel, scale = 0.5/std and bias =
−mean·scale of the sampled latents (``latent_statistics`` of the encode's dataset.json: std
``std_of_samples``, mean ``mean_of_means``), so each channel has mean 0 and std 0.5.

Resumable: each stage writes its result atomically and is skipped when it exists; an
interrupted estimate resumes from its own checkpoint, an interrupted training from its last
checkpoint. Everything goes through lossfloor's CLI (``lossfloor.cli.main``) and public API.

    python experiments/latents/study.py --budget full --latents fmnist-latents.zip

Without ``--latents`` (or where the file is missing) the training set is encoded first with
``lossfloor encode --data fashion-mnist --vae docs/experiments/latents/vae``.
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossfloor.cli import main as lossfloor
from lossfloor.data import load_dataset
from lossfloor.data.dataset import Dataset, mean_and_variance, posterior_variance
from lossfloor.diagnosis import REL_FLOOR, Diagnosis
from lossfloor.io import read_json, save_with, write_csv, write_json
from lossfloor.optimal import Curve
from lossfloor.progress import progress_bar
from lossfloor.schedules.tabulated import STAR_THRESHOLD, sigma_star

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: Sizes per budget: items N, outer draws M, the σ grid, training steps, batch, preset, seeds.
BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": {"n": 50, "outer": 32, "sigmas": "0.01:20:4", "steps": 3, "batch": 8,
             "model": "tiny", "seeds": "0"},
    "small": {"n": 2000, "outer": 512, "sigmas": "0.01:20:12", "steps": 200, "batch": 64,
              "model": "small", "seeds": "0"},
    "full": {"n": 10000, "outer": 4096, "sigmas": "0.01:20:24", "steps": 800, "batch": 128,
             "model": "small", "seeds": "0"},
}  # fmt: skip

#: The three readings of the latents: name, description, the data options' extra arguments.
CURVES = {
    "mixture": "(a) Gaussian items N(m, s²): the latents as training draws them",
    "means": "(b) the means m as points (the std dropped)",
    "sampled": "(c) one sampled latent m + s·z per image, as points",
}

#: Outer draws per reading: Gaussian items take plain ε only; points take estimate's tilted
#: draws (importance-sampled toward each source's neighbours), without which J* below σ* rests
#: on no draw (ESS 0) and reads 0.
DRAWS = {"mixture": "plain", "means": "tilted", "sampled": "tilted"}

#: The model's loss against which J*: ``gaps.csv``'s ``against`` and the plot's labels.
AGAINST = {
    "mixture": "J_θ / J* of (a), paired (right)",
    "means": "on the means / J* of (b), paired (diagnose --key mean)",
    "latent-loss-vs-means": "J_θ on the latents / J* of (b)",
}


@dataclass(frozen=True)
class Study:
    """The study's inputs, where it writes, and the data options each reading takes."""

    latents: Path
    work: Path
    out: Path
    n: int
    outer: int
    sigmas: str
    steps: int
    batch: int
    model: str
    seeds: tuple[int, ...]
    seed: int
    sample_seed: int
    device: str
    quiet: bool

    def data(self, curve: str, scale: str, bias: str) -> list[str]:
        """The data options of one reading (a: the zip, b: its means, c: the sampled npz)."""
        if curve == "sampled":
            return ["--data", str(self.work / "sampled.npz")]
        key = ["--key", "mean"] if curve == "means" else []
        transform = ["--latent-scale", scale, "--latent-bias", bias]
        return ["--data", str(self.latents), "--limit", str(self.n), *key, *transform]

    def quiet_flag(self) -> list[str]:
        return ["--quiet"] if self.quiet else []


def run_cli(argv: list[str]) -> None:
    """``lossfloor ARGV`` in this process; a nonzero exit ends the study with it."""
    rc = lossfloor(argv)
    if rc:
        raise SystemExit(f"study: `lossfloor {' '.join(argv)}` exited with {rc}")


def edm2_transform(latents: Path) -> dict[str, Any]:
    """Per channel scale = 0.5/std and bias = −mean·scale of the sampled latents, from the
    zip's dataset.json ``latent_statistics`` (the 6 significant digits the CLI is given)."""
    with zipfile.ZipFile(latents) as zf:
        stats = json.loads(zf.read("dataset.json"))["latent_statistics"]
    scale = [0.5 / s for s in stats["std_of_samples"]]
    bias = [-m * s for m, s in zip(stats["mean_of_means"], scale, strict=True)]
    return {
        "rule": "EDM2's: per channel mean 0 and std 0.5 of the sampled latents "
        "(scale = 0.5/std_of_samples, bias = -mean_of_means*scale)",
        "latent_statistics": stats,
        "latent_scale": ",".join(f"{v:.6g}" for v in scale),
        "latent_bias": ",".join(f"{v:.6g}" for v in bias),
    }


def items(study: Study, transform: dict[str, Any]) -> Dataset:
    """The N Gaussian items in final units, as every stage reads them."""
    return load_dataset(
        str(study.latents),
        limit=study.n,
        latent_scale=[float(v) for v in transform["latent_scale"].split(",")],
        latent_bias=[float(v) for v in transform["latent_bias"].split(",")],
    )


def write_sampled(study: Study, transform: dict[str, Any]) -> None:
    """sampled.npz: x = m + s·z per item (z ~ N(0, I), torch generator seeded with
    ``sample_seed``), float32, with the labels."""
    ds = items(study, transform)
    assert ds.std is not None
    z = torch.randn(ds.x.shape, generator=torch.Generator().manual_seed(study.sample_seed))
    x = (ds.x + ds.std * z).numpy()
    y = None if ds.labels is None else ds.labels.numpy()

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:
            if y is None:
                np.savez(f, x=x)
            else:
                np.savez(f, x=x, y=y)

    save_with(study.work / "sampled.npz", save)


def train_marker(study: Study, transform: dict[str, Any], seed: int) -> None:
    """Train (or resume) the run of ``seed``, then write train-seed{seed}.json: its sizes, the
    wall time and the last logged loss."""
    run = study.work / f"train-seed{seed}"
    started = time.time()
    resume = ["--resume"] if (run / "checkpoint-latest.pt").exists() else []
    progress = ["--no-progress"] if study.quiet else []
    run_cli(["train", *study.data("mixture", transform["latent_scale"], transform["latent_bias"]),
             "--run-dir", str(run), "--steps", str(study.steps), "--batch", str(study.batch),
             "--model", study.model, "--seed", str(seed), "--device", study.device,
             "--checkpoint-every", "100", *resume, *progress])  # fmt: skip
    lines = (run / "stats.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    config = read_json(run / "config.json")
    write_json(study.out / f"train-seed{seed}.json", {
        "run": run.name, "seed": seed, "steps": study.steps, "batch": study.batch,
        "model": study.model, "parameters": config.get("parameters"),
        "train_seconds": last["seconds"], "this_call_seconds": time.time() - started,
        "last_loss": last["loss"], "last_loss_x0": last["loss_x0"],
    })  # fmt: skip


#: The stages' groups, in order (``--stages`` picks some).
GROUPS = ("encode", "data", "estimate", "train", "diagnose", "summary")


def stages(study: Study, pixels: str, vae: str) -> list[tuple[str, Path, str, Callable[[], None]]]:
    """(group, result file, description, action) in order; an action runs only where its file
    is missing."""
    out, work = study.out, study.work
    out_t = out / "transform.json"

    def transform() -> dict[str, Any]:
        return read_json(out_t)

    def estimate(curve: str) -> Callable[[], None]:
        def go() -> None:
            t = transform()
            run_cli(["estimate", *study.data(curve, t["latent_scale"], t["latent_bias"]),
                     "--sigmas", study.sigmas, "--outer", str(study.outer), "--seed",
                     str(study.seed), "--draws", DRAWS[curve], "--device", study.device,
                     "--out", str(out / f"jstar-{curve}.json"),
                     "--csv", str(out / f"jstar-{curve}.csv"), *study.quiet_flag()])  # fmt: skip

        return go

    def diagnose(curve: str, seed: int) -> Callable[[], None]:
        def go() -> None:
            t = transform()
            name = f"diagnose-{curve}-seed{seed}"
            run_cli(["diagnose", "--model", str(work / f"train-seed{seed}"),
                     *study.data(curve, t["latent_scale"], t["latent_bias"]),
                     "--sigmas", study.sigmas, "--outer", str(study.outer), "--seed",
                     str(study.seed), "--draws", DRAWS[curve], "--device", study.device,
                     "--out", str(out / f"{name}.json"), "--csv", str(out / f"{name}.csv"),
                     *study.quiet_flag()])  # fmt: skip

        return go

    encode = ["encode", "--data", pixels, "--vae", vae, "--out", str(study.latents),
              "--device", study.device]  # fmt: skip
    todo: list[tuple[str, Path, str, Callable[[], None]]] = [
        ("encode", study.latents, "encode the training set", lambda: run_cli(encode)),
        ("data", out_t, "the EDM2 transform",
         lambda: write_json(out_t, edm2_transform(study.latents))),
        ("data", work / "sampled.npz", "one sampled latent per image",
         lambda: write_sampled(study, transform())),
    ]  # fmt: skip
    todo += [("estimate", out / f"jstar-{c}.json", f"J* {c}", estimate(c)) for c in CURVES]

    def train(seed: int) -> Callable[[], None]:
        return lambda: train_marker(study, transform(), seed)

    todo += [("train", out / f"train-seed{s}.json", f"train seed {s}", train(s))
             for s in study.seeds]  # fmt: skip
    for s in study.seeds:
        todo += [("diagnose", out / f"diagnose-{c}-seed{s}.json", f"diagnose {c} seed {s}",
                  diagnose(c, s)) for c in ("mixture", "means")]  # fmt: skip
    todo.append(("summary", out / "summary.json", "summary, table, plot",
                 lambda: summarise(study)))  # fmt: skip
    return todo


def summarise(study: Study) -> None:
    """summary.json, table.csv (J* of the three readings per σ, the bounds of (a)), gaps.csv
    (each seed's J_θ, J*, gap and J_θ/J* against (a) and (b)) and latents.png."""
    out = study.out
    transform = read_json(out / "transform.json")
    curves = {c: Curve.load(out / f"jstar-{c}.json") for c in CURVES}
    sig = curves["mixture"].sigmas
    ds = items(study, transform)
    assert ds.std is not None
    s2 = ds.std.double().reshape(ds.n, -1).square()
    # (a)'s bounds: knowing the item gives mean(s²σ²/(s²+σ²)) ≤ J*; x_t itself gives σ²
    lower = np.array([float((s2 * v**2 / (s2 + v**2)).mean()) for v in sig])
    _, var_means = mean_and_variance(ds.x)
    within = posterior_variance(ds.std)
    summary: dict[str, Any] = {
        "n": study.n, "outer": study.outer, "sigmas": study.sigmas, "seed": study.seed,
        "sample_seed": study.sample_seed, "train_seeds": list(study.seeds),
        "transform": transform, "variance_of_means": var_means, "mean_posterior_variance": within,
        "star_threshold": STAR_THRESHOLD, "curves": {},
    }  # fmt: skip
    for c, curve in curves.items():
        var = float(curve.data_variance or 0.0)
        summary["curves"][c] = {
            "what": CURVES[c], "data_variance": var,
            "sigma_star": sigma_star(curve.sigmas, curve.values, var),
            "seconds": curve.provenance.get("seconds") if curve.provenance else None,
            "j_star_at_largest_sigma": float(curve.values[-1]),
        }  # fmt: skip
    a = curves["mixture"]
    summary["small_sigma"] = [
        {"sigma": float(v), "j_star": float(j), "stderr": float(e), "lower": float(lo),
         "sigma2": float(v * v), "j_over_sigma2": float(j / v**2), "lower_over_sigma2":
         float(lo / v**2), "within_bounds": bool(lo - 4 * e <= j <= v * v + 4 * e)}
        for v, j, e, lo in zip(sig[:6], a.values[:6], a.stderrs[:6], lower[:6], strict=True)
    ]  # fmt: skip
    header = ["sigma"] + [f"{c}{k}" for c in CURVES for k in ("", "_stderr")]
    rows = [
        [float(v)] + [float(x) for c in CURVES for x in (curves[c].values[i], curves[c].stderrs[i])]
        + [float(lower[i]), float(v * v)]
        for i, v in enumerate(sig)
    ]  # fmt: skip
    write_csv(out / "table.csv", header + ["mixture_lower", "sigma2"], rows)
    gaps: dict[str, list[tuple[float, float]]] = {}
    gap_rows: list[list[Any]] = []
    means = curves["means"]

    def add(seed: int, against: str, pts: list[tuple[float, ...]]) -> None:
        gaps[f"{against}-seed{seed}"] = ratios(pts)
        gap_rows.extend([seed, against, *p, None if np.isnan(q) else q]
                        for p, (_, q) in zip(pts, ratios(pts), strict=True))  # fmt: skip

    for s in study.seeds:
        for c in ("mixture", "means"):
            d = Diagnosis.load(out / f"diagnose-{c}-seed{s}.json")
            add(s, c, [(p.sigma, p.model_loss, p.optimal_loss, p.gap, p.gap_stderr)
                       for p in d.points])  # fmt: skip
            if c == "mixture":  # the model's loss on its own data against (b)'s estimate
                assert np.allclose([p.sigma for p in d.points], means.sigmas)
                add(s, "latent-loss-vs-means", [
                    (p.sigma, p.model_loss, float(j), p.model_loss - float(j),
                     p.model_loss_stderr + float(e))
                    for p, j, e in zip(d.points, means.values, means.stderrs, strict=True)
                ])  # fmt: skip
        summary[f"train_seed{s}"] = read_json(out / f"train-seed{s}.json")
    write_csv(out / "gaps.csv", ["train_seed", "against", "sigma", "model_loss", "optimal_loss",
                                 "gap", "gap_stderr", "model_over_optimal"], gap_rows)  # fmt: skip
    plot(out / "latents.png", curves, summary, lower, gaps)
    write_json(out / "summary.json", summary)


def ratios(pts: list[tuple[float, ...]]) -> list[tuple[float, float]]:
    """(σ, J_θ/J*) of points (σ, J_θ, J*, …), NaN where J* < REL_FLOOR × their largest J*
    (diagnose's rule: there J* ≈ 0, the optimum memorises, and the ratio says nothing)."""
    top = max(p[2] for p in pts)
    return [(p[0], p[1] / p[2] if p[2] > 0 and p[2] >= REL_FLOOR * top else np.nan)
            for p in pts]  # fmt: skip


def plot(
    path: Path,
    curves: dict[str, Curve],
    summary: dict[str, Any],
    lower: np.ndarray,
    gaps: dict[str, list[tuple[float, float]]],
) -> None:
    """Left: the three J* curves (log-log, per element) with their σ* marks, σ² and (a)'s
    lower bound mean(s²σ²/(s²+σ²)); right: J_θ/J* of each seed's model against (a) and (b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"mixture": "C0", "means": "C1", "sampled": "C2"}
    sig = curves["mixture"].sigmas
    for c, curve in curves.items():
        v = np.where(curve.values > 0, curve.values, np.nan)
        left.errorbar(curve.sigmas, v, yerr=curve.stderrs, fmt="o-", ms=3, color=colours[c],
                      label=CURVES[c])  # fmt: skip
        star = summary["curves"][c]["sigma_star"]
        if star is not None:
            left.axvline(star, color=colours[c], ls=":", lw=1)
    left.plot(sig, sig**2, "k--", lw=0.8, label="σ² (the identity denoiser)")
    left.plot(sig, lower, "k-.", lw=0.8, label="mean(s²σ²/(s²+σ²)) (item known)")
    top = max(float(c.values.max()) for c in curves.values())
    left.set(xscale="log", yscale="log", xlabel="σ (VE, final latent units)",
             ylabel="J*(σ) per element", ylim=(max(1e-7, 1e-6 * top), 2 * top),
             title="J* of the latents (dotted: σ*)")  # fmt: skip
    left.legend(fontsize=7, loc="lower right")
    for name, points in gaps.items():
        reading, seed = name.rsplit("-", 1)
        s, r = np.array(points).T
        right.plot(
            s,
            r,
            "o-" if reading in colours else "s--",
            ms=3,
            color=colours.get(reading, "C3"),
            label=f"{AGAINST[reading]}, model {seed}",
        )
    right.axhline(1, color="k", lw=0.8)
    right.set(xscale="log", yscale="log", xlabel="σ", ylabel="J_θ / J*",
              title="the model's normalised loss")  # fmt: skip
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=list(BUDGETS), default="full")
    for name, kind in (("n", int), ("outer", int), ("sigmas", str), ("steps", int),
                       ("batch", int), ("model", str), ("seeds", str)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, help=f"override the budget's {name}")
    p.add_argument("--latents", help="the training set's EDM2 latent zip (default WORK/"
                   "fmnist-latents.zip; encoded there when missing)")  # fmt: skip
    p.add_argument("--pixels", default="fashion-mnist", help="images to encode (default "
                   "fashion-mnist)")  # fmt: skip
    p.add_argument("--vae", default=str(REPO / "docs/experiments/latents/vae"))
    p.add_argument(
        "--work",
        default=str(REPO / ".cache/latents-study"),
        help="large intermediate files: the latents, runs, sampled.npz",
    )
    p.add_argument(
        "--out",
        default=str(REPO / "docs/experiments/latents/study"),
        help="the results: JSON, CSV, the plot",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the (x0, ε) draws (default 0)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of z in (c) (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no tables and no progress bars")
    p.add_argument(
        "--stages",
        default=",".join(GROUPS),
        help=f"the groups to run, in order (default all: {','.join(GROUPS)})",
    )
    args = p.parse_args(argv)
    size = {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in BUDGETS[args.budget].items()}  # fmt: skip
    work = Path(args.work)
    study = Study(
        latents=Path(args.latents) if args.latents else work / "fmnist-latents.zip",
        work=work, out=Path(args.out), n=size["n"], outer=size["outer"],
        sigmas=size["sigmas"], steps=size["steps"], batch=size["batch"], model=size["model"],
        seeds=tuple(int(s) for s in str(size["seeds"]).split(",")), seed=args.seed,
        sample_seed=args.sample_seed, device=args.device, quiet=args.quiet,
    )  # fmt: skip
    picked = set(args.stages.split(","))
    if not picked <= set(GROUPS):
        p.error(f"--stages: one or more of {','.join(GROUPS)}, not {args.stages}")
    todo = [t for t in stages(study, args.pixels, args.vae) if t[0] in picked]
    bar = progress_bar(todo, desc="study", unit="stage", enabled=not args.quiet)
    for _, path, what, action in bar:
        if path.exists():
            continue
        bar.set_postfix(stage=what)
        started = time.time()
        action()
        if not args.quiet:
            print(f"study: {what}: {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
