"""Diagnosis: a model's per-σ loss against the optimal loss on the same draws (method.md §4).

    gap(σ) = J_θ(σ) − J*(σ),  J_θ(σ) = E‖D_θ(x0 + σε, σ) − x0‖²/D,  J*(σ) = E‖μ(x0 + σε) − x0‖²/D

Both terms are evaluated on the same (x0, ε) draws (``lossfloor.optimal.outer``), so the gap's
standard error comes from the paired per-sample differences and is small. Reading a gap: below
σ* (where J* ≈ 0) the training set's optimum is the memorising denoiser, which a model that
generalises never reaches, so a gap there is partly the price of generalisation, not only
underfitting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lossfloor import __version__
from lossfloor.data import Dataset
from lossfloor.errors import UserError
from lossfloor.optimal import Curve, Full, Pool, posterior_mean
from lossfloor.optimal.outer import (
    OUTER_BLOCK,
    OuterPlan,
    base_dtype,
    block_noise,
    choose_dtype,
    make_pools,
    mean_and_stderr,
    per_sample_values,
)

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]


class OptimalDenoiser(nn.Module):
    """D*(x, σ, labels) = E[x0 | x0 + σε = x] over the empirical set (softmax over all points);
    with ``conditional`` and labels, over the points of each query's class."""

    def __init__(self, dataset: Dataset, conditional: bool = False, precision: str = "auto"):
        super().__init__()
        if conditional and dataset.labels is None:
            raise UserError("a conditional optimal denoiser needs labels; this dataset has none")
        self.shape = dataset.shape
        self.conditional = conditional
        self.precision = precision
        flat = dataset.flat()
        if conditional:
            self.groups = {
                c: flat[dataset.labels == c] for c in torch.unique(dataset.labels).tolist()
            }
        else:
            self.groups = {-1: flat}
        self._pools: dict[tuple[int, torch.dtype], Pool] = {}

    def _pool(self, key: int, dtype: torch.dtype) -> Pool:
        if (key, dtype) not in self._pools:
            self._pools[(key, dtype)] = Pool.from_data(self.groups[key], dtype, "cpu")
        return self._pools[(key, dtype)]

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).cpu()
        s = s.expand(n) if s.numel() == 1 else s
        keys = [-1] * n if not self.conditional else labels.reshape(-1).tolist()
        if self.conditional and labels is None:
            raise UserError("the conditional optimal denoiser needs class labels")
        out = torch.empty(n, flat.shape[1], dtype=torch.float64)
        key_t = torch.tensor(keys)
        for key in set(keys):
            for sv in torch.unique(s[key_t == key]).tolist():
                sel = torch.nonzero((key_t == key) & (s == sv)).flatten()
                base = self._pool(key, base_dtype(self.precision))
                dtype = choose_dtype(self.precision, [base], sv)
                pool = self._pool(key, dtype)
                q = flat[sel].cpu().double() - pool.mean
                mu = posterior_mean(q.to(dtype), None, sv, keys_aug=pool.aug).mean()
                out[sel] = mu.double() + pool.mean
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def loss_factor_of(model: DenoiserFn, sigma: float) -> float | None:
    """The model's target-units/x0-units loss factor at σ, if it is a lossfloor Denoiser."""
    fn = getattr(model, "loss_factor", None)
    return None if fn is None else float(fn(torch.tensor(sigma, dtype=torch.float64)))


@torch.no_grad()
def model_per_sample_loss(
    model: DenoiserFn,
    dataset: Dataset,
    plan: OuterPlan,
    sigma: float,
    batch: int,
    device: torch.device,
    labels: Tensor | None,
) -> Tensor:
    """‖D_θ(x0 + σε, σ) − x0‖²/D for every outer draw of ``plan`` (float64)."""
    m = plan.sources.numel()
    out = torch.empty(m, dtype=torch.float64)
    for j in range(plan.blocks):
        lo, hi = j * OUTER_BLOCK, min(m, (j + 1) * OUTER_BLOCK)
        eps = block_noise(plan.seed, j, hi - lo, dataset.dim)
        for b in range(lo, hi, batch):
            e = min(hi, b + batch)
            src = plan.sources[b:e]
            x0 = dataset.x[src].to(device)
            noise = eps[b - lo : e - lo].reshape(x0.shape).to(device=device, dtype=x0.dtype)
            sig = torch.full((e - b,), sigma, dtype=x0.dtype, device=device)
            lab = None if labels is None else labels[src].to(device)
            pred = model(x0 + sigma * noise, sig, lab)
            out[b:e] = (pred.double() - x0.double()).pow(2).flatten(1).mean(1).cpu()
    return out


def diagnose(
    model: DenoiserFn,
    dataset: Dataset,
    sigmas: Sequence[float],
    *,
    outer: int = 2048,
    seed: int = 0,
    batch: int = 256,
    conditional: bool = False,
    use_labels: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per σ: model loss, optimal loss, the paired gap and its standard error (per element, x0
    units; also in the model's target units when it is a lossfloor Denoiser)."""
    from tqdm.auto import tqdm

    if not sigmas:
        raise UserError("the σ list is empty; give at least one σ > 0")
    device = torch.device(device)
    plan = OuterPlan.build(dataset.x, dataset.labels, outer, seed, conditional)
    labels = dataset.labels if use_labels else None
    if use_labels and labels is None:
        raise UserError("the model is class-conditional but the dataset has no labels")
    pools = {torch.float32: make_pools(plan, torch.float32, device)}
    points = []
    for sigma in tqdm(sigmas, disable=not progress, desc="diagnose", unit="σ", leave=False):
        t0 = time.perf_counter()
        dtype = choose_dtype("auto", pools[torch.float32], sigma)
        if dtype not in pools:
            pools[dtype] = make_pools(plan, dtype, device)
        opt = per_sample_values(plan, Full(), sigma, dtype, device, pools[dtype]).direct
        mod = model_per_sample_loss(model, dataset, plan, sigma, batch, device, labels)
        if not torch.isfinite(mod).all():
            raise UserError(f"the model's output is not finite at σ = {sigma:g}")
        (jm, jm_se), (jo, jo_se) = mean_and_stderr(mod), mean_and_stderr(opt)
        gap, gap_se = mean_and_stderr(mod - opt)
        point = {
            "sigma": sigma,
            "model_loss": jm,
            "model_loss_stderr": jm_se,
            "optimal_loss": jo,
            "optimal_loss_stderr": jo_se,
            "gap": gap,
            "gap_stderr": gap_se,
            "relative_gap": gap / jo if jo > 0 else None,
            "seconds": time.perf_counter() - t0,
        }
        factor = loss_factor_of(model, sigma)
        if factor is not None:
            point["loss_factor"] = factor
            point["model_loss_target"] = point["model_loss"] * factor
            point["optimal_loss_target"] = point["optimal_loss"] * factor
            point["gap_target"] = point["gap"] * factor
        points.append(point)
    return {
        **(record or {}),
        "dataset": {**dataset.describe(), "conditional": conditional},
        "outer": outer,
        "seed": seed,
        "per_element": True,
        "units": "VE sigma, x0 per element; *_target in the model's target units",
        "lossfloor_version": __version__,
        "points": points,
    }


def load_diffusers_pipeline(path: str | Path, device: str | torch.device = "cpu"):
    """A locally saved diffusers UNet2DModel + DDPMScheduler (``save_pretrained``) as a Denoiser:
    ε-prediction on the scheduler's discrete VP process, timesteps as the noise input."""
    from diffusers import DDPMScheduler, UNet2DModel

    from lossfloor.diffusion import Denoiser, VPDiscrete

    root = Path(path)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{root} is not a saved diffusers UNet2DModel + DDPMScheduler: {exc}"
        ) from None
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(
            f"{root}: prediction_type {scheduler.config.prediction_type!r}; "
            "only epsilon is supported"
        )

    def net(x_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        t = c_noise.reshape(-1).expand(x_in.shape[0])
        return unet(x_in, t, class_labels=labels).sample

    process = VPDiscrete(scheduler.alphas_cumprod.double())
    denoiser = Denoiser(net, process, "eps", scale_input=False)
    denoiser.unet = unet  # registers the weights with the Module (device moves, eval)
    return denoiser.to(device).eval().requires_grad_(False)


def load_model(
    spec: str, dataset: Dataset, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[DenoiserFn, dict[str, Any]]:
    """``optimal`` | a lossfloor run directory or checkpoint | a saved diffusers pipeline."""
    if spec == "optimal":
        return OptimalDenoiser(dataset), {"kind": "optimal", "conditional": False}
    path = Path(spec)
    if not path.exists():
        raise UserError(f"model not found: {spec} (a run directory, checkpoint, or 'optimal')")
    if (
        (path / "model_index.json").is_file()
        or (path / "scheduler").is_dir()
        or (path / "scheduler_config.json").is_file()
    ):
        return load_diffusers_pipeline(path, device), {"kind": "diffusers", "path": str(path)}
    from lossfloor.training.loop import check_compatible, load_run

    denoiser, config = load_run(path, ema=ema, device=device)
    check_compatible(config, dataset)
    conditional = config["model"].get("num_classes") is not None
    return denoiser, {"kind": "lossfloor-run", "path": str(path), "ema": ema,
                      "conditional": conditional, "config": config}  # fmt: skip


class GapMonitor:
    """A training callback: the gap at a few σ on fixed draws, from a cached J* curve.

    Call as ``monitor(step, denoiser, record)``; adds ``record["gap"] = {σ: J_θ − J*}``. The
    draws (``n`` sources and noises) are fixed at construction, so successive values are paired.
    """

    def __init__(
        self,
        curve: Curve,
        dataset: Dataset,
        sigmas: Sequence[float] = (0.2, 1.0, 5.0),
        n: int = 256,
        seed: int = 0,
        labels: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.sigmas = [float(s) for s in sigmas]
        self.optimal = {s: float(curve(s)) for s in self.sigmas}  # checks the grid covers σ
        self.dataset = dataset
        self.plan = OuterPlan.build(dataset.x, dataset.labels, n, seed, False)
        self.labels = dataset.labels if labels else None
        self.seconds = 0.0

    def __call__(self, step: int, denoiser: DenoiserFn, record: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        gaps = {}
        for s in self.sigmas:
            loss = model_per_sample_loss(
                denoiser, self.dataset, self.plan, s, 256, self.device, self.labels
            ).mean()
            gaps[f"{s:g}"] = float(loss) - self.optimal[s]
        record["gap"] = gaps
        self.seconds += time.perf_counter() - t0


def plot_diagnosis(path: str | Path, rec: dict[str, Any], title: str = "") -> None:
    """J* and J_θ against σ (log axes) above, the gap ± 2 s.e. below."""
    from lossfloor.plots import plt, save_figure

    pts = rec["points"]
    s = np.array([p["sigma"] for p in pts])
    jm = np.array([p["model_loss"] for p in pts])
    jo = np.array([p["optimal_loss"] for p in pts])
    g = np.array([p["gap"] for p in pts])
    gse = np.array([p["gap_stderr"] for p in pts])
    fig, (a, b) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True, height_ratios=[3, 2])
    floor = max(min(v for v in np.concatenate([jm, jo]) if v > 0) / 3, jm.max() * 1e-8)
    a.plot(s, np.maximum(jm, floor), "o-", ms=3, label="model J_θ(σ)")
    a.plot(s, np.maximum(jo, floor), "s-", ms=3, label="optimal J*(σ)")
    a.set(xscale="log", yscale="log", ylabel="loss per element (x0 units)", title=title)
    b.errorbar(s, g, yerr=2 * gse, fmt="o-", ms=3, capsize=2, color="C3")
    b.axhline(0, color="gray", lw=0.8)
    b.set(xscale="log", xlabel="σ (VE)", ylabel="gap J_θ − J*")
    b.text(0.01, 0.97, "where J* ≈ 0 the optimum memorises: a gap there is\npartly the price "
           "of generalisation, not only underfitting", transform=b.transAxes, va="top",
           fontsize=7, color="gray")  # fmt: skip
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend()
    save_figure(fig, path)
