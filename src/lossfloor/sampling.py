"""Deterministic samplers of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ in VE coordinates.

Karras et al. 2022 (EDM), Algorithm 1 with S_churn = 0:
  σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i < N,  σ_N = 0;
  d_i = (x_i − D(x_i, σ_i))/σ_i,  x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i          (Euler)
  Heun: if σ_{i+1} ≠ 0, d' = (x_{i+1} − D(x_{i+1}, σ_{i+1}))/σ_{i+1},
        x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d')/2   (2N − 1 evaluations of D).
Works with any D(x, sigma, labels); σ is passed as one value per image, in x's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from lossfloor.errors import ParameterError, UserError

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]
SAMPLERS = ("heun", "euler")
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's defaults


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """The N+1 levels σ_0 = σ_max > … > σ_{N−1} = σ_min > σ_N = 0 (float64)."""
    if n < 1:
        raise UserError(f"the number of sampling steps must be at least 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if not rho > 0:
        raise UserError(f"rho must be > 0, got {rho}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (n - 1) * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints despite rounding
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _d(denoiser: DenoiserFn, x: Tensor, sigma: float, labels: Tensor | None) -> Tensor:
    """dx/dσ = (x − D(x, σ))/σ."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    return (x - denoiser(x, s, labels).to(x.dtype)) / sigma


@torch.no_grad()
def _integrate(
    denoiser: DenoiserFn, x_T: Tensor, sigmas: Tensor, labels: Tensor | None, heun: bool
) -> Tensor:
    levels = [float(s) for s in sigmas]
    steps = list(zip(levels[:-1], levels[1:], strict=True))
    if not steps or levels[-1] != 0 or any(a <= b for a, b in steps):
        raise UserError("sigmas must decrease strictly to a final 0 (use karras_sigmas)")
    x = x_T
    for cur, nxt in steps:
        d = _d(denoiser, x, cur, labels)
        x_next = x + (nxt - cur) * d
        if heun and nxt != 0:
            x_next = x + (nxt - cur) * 0.5 * (d + _d(denoiser, x_next, nxt, labels))
        x = x_next
    return x


def sample_heun(
    denoiser: DenoiserFn, x_T: Tensor, sigmas: Tensor, labels: Tensor | None = None
) -> Tensor:
    """EDM's deterministic 2nd-order sampler from x_T (≈ σ_0·N(0, I)) down the levels ``sigmas``."""
    return _integrate(denoiser, x_T, sigmas, labels, heun=True)


def sample_euler(
    denoiser: DenoiserFn, x_T: Tensor, sigmas: Tensor, labels: Tensor | None = None
) -> Tensor:
    """The 1st-order (Euler) sampler on the same ODE: N evaluations of D."""
    return _integrate(denoiser, x_T, sigmas, labels, heun=False)


def initial_noise(seeds: Sequence[int], shape: Sequence[int], sigma_max: float) -> Tensor:
    """x_T = σ_max·z with image i's z drawn from its own generator seeded ``seeds[i]`` (EDM),
    so each image is independent of the batch it is drawn in (float64, CPU)."""
    z = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in seeds
    ]
    return sigma_max * torch.stack(z)


def generate(
    denoiser: DenoiserFn,
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    steps: int = 18,
    sampler: str = "heun",
    labels: Tensor | None = None,
    batch: int = 64,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Tensor:
    """One sample per seed (N×C×H×W on CPU, float32), drawn in batches of ``batch``."""
    from tqdm import tqdm

    if sampler not in SAMPLERS:
        raise ParameterError("sampler", sampler, f"choose one of: {', '.join(SAMPLERS)}")
    if batch < 1:
        raise ParameterError("batch", batch, "must be at least 1")
    if labels is not None and len(labels) != len(seeds):
        raise UserError(f"got {len(labels)} labels for {len(seeds)} samples; give one per sample")
    run = sample_heun if sampler == "heun" else sample_euler
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    out = []
    for i in tqdm(
        range(0, len(seeds), batch),
        disable=None if progress is None else not progress,
        unit="batch",
    ):
        x_T = initial_noise(seeds[i : i + batch], shape, sigma_max).to(device, dtype)
        y = None if labels is None else labels[i : i + batch].to(device)
        out.append(run(denoiser, x_T, sigmas, y).float().cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


def to_uint8(x: Tensor) -> Tensor:
    """Images in [−1, 1] (N×C×H×W) → uint8 N×H×W×C: round(127.5·x + 127.5) clipped to 0..255."""
    return (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def image_grid(x: Tensor, ncol: int | None = None, min_tile: int = 32) -> Image.Image:
    """A PIL image of N×C×H×W images in [−1, 1] on ``ncol`` (default ⌈√N⌉) columns with grey
    (128) 1-pixel gaps; tiles upscaled (nearest) by ⌈min_tile / min(H, W)⌉ so 8×8 digits show."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise UserError(f"a grid needs N×C×H×W images with C = 1 or 3, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = -(-n // ncol)
    scale = max(1, -(-min_tile // min(h, w)))
    tiles = to_uint8(x).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    th, tw = h * scale, w * scale
    canvas = torch.full((nrow * (th + 1) - 1, ncol * (tw + 1) - 1, c), 128, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        canvas[r * (th + 1) : r * (th + 1) + th, q * (tw + 1) : q * (tw + 1) + tw] = tiles[k]
    array = canvas.numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)  # uint8: mode L or RGB
