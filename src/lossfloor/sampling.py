"""EDM's samplers of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ in VE coordinates.

Karras et al. 2022 (EDM), Algorithms 1 and 2, on any D(x, sigma, labels) (a lossfloor
``Denoiser``, an EDM network, a wrapped k-diffusion model — ``read_protocol``):
  levels: σ_min ← max(σ_min, net.sigma_min), σ_max ← min(σ_max, net.sigma_max),
          σ_i = round_sigma((σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ), i < N,  σ_N = 0;
  churn:  γ_i = min(S_churn/N, √2 − 1) if S_min ≤ σ_i ≤ S_max else 0,
          σ̂ = round_sigma(σ_i + γ_i·σ_i),  x̂ = x_i + √(σ̂² − σ_i²)·S_noise·z,  z ~ N(0, I);
  Euler:  d = (x̂ − D(x̂, σ̂))/σ̂,  x_{i+1} = x̂ + (σ_{i+1} − σ̂)·d;
  Heun:   if σ_{i+1} ≠ 0, d' = (x_{i+1} − D(x_{i+1}, σ_{i+1}))/σ_{i+1},
          x_{i+1} = x̂ + (σ_{i+1} − σ̂)·(½d + ½d')   (2N − 1 evaluations of D without churn).
``generate`` draws image i's latents as EDM's generate.py does: a torch.Generator on the
sampling device seeded ``seed mod 2³²``, float32 normals of shape [C, H, W]; the churn noise z
comes from the same per-image generators (float64, one draw per step, after EDM's class draw
for a class-conditional model), so the same seed, resolution and device give EDM's images.
The state is float64, D is evaluated in ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lossfloor.diffusion.denoiser import as_denoiser, read_protocol
from lossfloor.errors import ParameterError, UserError
from lossfloor.progress import progress_bar

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
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


def sigma_range(
    model: Any, sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[float, float]:
    """The sampling range: EDM's (0.002, 80) clamped to the model's [sigma_min, sigma_max] as
    EDM's sampler does; a value given here must lie in the model's range (else a one-line
    error naming the parameter)."""
    p = read_protocol(model)
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and not p.sigma_min <= value <= p.sigma_max:
            raise ParameterError(
                name, value, f"outside the model's range [{p.sigma_min:g}, {p.sigma_max:g}]"
            )
    lo = max(SIGMA_MIN, p.sigma_min) if sigma_min is None else sigma_min
    hi = min(SIGMA_MAX, p.sigma_max) if sigma_max is None else sigma_max
    if not 0 < lo < hi:
        raise ParameterError("sigma_min", lo, f"need 0 < sigma_min < sigma_max = {hi:g}")
    return lo, hi


def sampling_sigmas(
    model: Any,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = RHO,
) -> Tensor:
    """EDM's levels for ``model``: ``karras_sigmas`` on ``sigma_range``, through the model's
    ``round_sigma``, then σ_N = 0 (float64)."""
    lo, hi = sigma_range(model, sigma_min, sigma_max)
    sigmas = karras_sigmas(n, lo, hi, rho)
    rounded = torch.as_tensor(read_protocol(model).round_sigma(sigmas[:-1])).to(torch.float64)
    return torch.cat([rounded.cpu(), sigmas[-1:]])


@dataclass(frozen=True)
class Churn:
    """EDM Algorithm 2's stochasticity: γ = min(S_churn/N, √2 − 1) on levels σ ∈ [S_min, S_max],
    fresh noise scaled by S_noise. The default (S_churn = 0) is the deterministic sampler."""

    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.S_churn < math.inf:
            raise ParameterError("S_churn", self.S_churn, "must be a number >= 0")
        if not 0 <= self.S_min <= self.S_max:
            raise ParameterError("S_min", self.S_min, f"need 0 <= S_min <= S_max = {self.S_max}")
        if not 0 <= self.S_noise < math.inf:
            raise ParameterError("S_noise", self.S_noise, "must be a number >= 0")


class SeedStreams:
    """EDM's per-image random streams (its ``StackedRandomGenerator``): image i draws from a
    torch.Generator on ``device`` seeded ``seeds[i] mod 2³²``, so an image does not depend on
    the batch it is drawn in."""

    def __init__(self, seeds: Sequence[int], device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds
        ]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """[len(seeds), *shape] standard normals, image i's from its own generator."""
        return torch.stack([
            torch.randn(tuple(shape), generator=g, dtype=dtype, device=self.device)
            for g in self.generators
        ])  # fmt: skip

    def randint(self, high: int) -> Tensor:
        """One integer in [0, high) per image (EDM's class draw), int64."""
        return torch.stack([
            torch.randint(high, size=[], generator=g, device=self.device) for g in self.generators
        ])  # fmt: skip

    def randn_like(self, x: Tensor) -> Tensor:
        """Normals shaped and typed like the batch ``x``."""
        return self.randn(x.shape[1:], x.dtype)


@torch.no_grad()
def _integrate(
    denoiser: Any,
    x_T: Tensor,
    sigmas: Tensor,
    labels: Tensor | None,
    heun: bool,
    churn: Churn | None = None,
    randn_like: Callable[[Tensor], Tensor] | None = None,
    callback: Callback | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The module docstring's loop; the state keeps x_T's dtype, D sees ``dtype`` (default the
    same). The callback gets k-diffusion's {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} after
    each step's first evaluation of D."""
    levels = [float(s) for s in sigmas]
    steps = list(zip(levels[:-1], levels[1:], strict=True))
    if not steps or levels[-1] != 0 or any(a <= b for a, b in steps):
        raise UserError("sigmas must decrease strictly to a final 0 (use karras_sigmas)")
    churn = churn or Churn()
    round_sigma = read_protocol(denoiser).round_sigma
    D = as_denoiser(denoiser)
    dtype = dtype or x_T.dtype
    draw = randn_like or torch.randn_like
    gamma_max = min(churn.S_churn / len(steps), math.sqrt(2) - 1)

    def denoise(x: Tensor, sigma: float) -> Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)
        return D(x.to(dtype), s, labels).to(x.dtype)

    x = x_T
    for i, (cur, nxt) in enumerate(steps):
        hat = cur
        if churn.S_churn > 0:  # one draw per step, as EDM's loop, so streams stay in step
            z = draw(x)
            if churn.S_min <= cur <= churn.S_max and gamma_max > 0:
                hat = float(round_sigma(torch.tensor(cur + gamma_max * cur, dtype=torch.float64)))
                x = x + math.sqrt(hat**2 - cur**2) * churn.S_noise * z
        denoised = denoise(x, hat)
        d = (x - denoised) / hat
        if callback is not None:
            callback({"x": x, "i": i, "sigma": cur, "sigma_hat": hat, "denoised": denoised})
        x_next = x + (nxt - hat) * d
        if heun and nxt != 0:
            d_prime = (x_next - denoise(x_next, nxt)) / nxt
            x_next = x + (nxt - hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def sample_heun(
    denoiser: Any, x_T: Tensor, sigmas: Tensor, labels: Tensor | None = None, **options: Any
) -> Tensor:
    """EDM's 2nd-order sampler from x_T (≈ σ_0·N(0, I)) down the levels ``sigmas``; options:
    ``churn``, ``randn_like``, ``callback``, ``dtype`` (of D's evaluations)."""
    return _integrate(denoiser, x_T, sigmas, labels, heun=True, **options)


def sample_euler(
    denoiser: Any, x_T: Tensor, sigmas: Tensor, labels: Tensor | None = None, **options: Any
) -> Tensor:
    """The 1st-order (Euler) sampler on the same ODE: N evaluations of D; options as Heun's."""
    return _integrate(denoiser, x_T, sigmas, labels, heun=False, **options)


def initial_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    sigma_max: float,
    device: str | torch.device = "cpu",
) -> Tensor:
    """EDM's x_T = σ_0·z, z image i's float32 latents from ``SeedStreams`` (float64 result)."""
    return SeedStreams(seeds, device).randn(shape).to(torch.float64) * sigma_max


def generate(
    denoiser: Any,
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    steps: int = 18,
    sampler: str = "heun",
    labels: Tensor | None = None,
    batch: int = 64,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = RHO,
    churn: Churn | None = None,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Tensor:
    """One sample per seed (N×C×H×W on CPU, float32), drawn in batches of ``batch`` on EDM's
    levels for the model (``sampling_sigmas``) from EDM's latents, with EDM's churn noise. A
    class-conditional model (``label_dim`` > 0) gets ``labels``, or else EDM's random classes
    (one draw per image from its stream, after the latents, made in either case as EDM does)."""
    if sampler not in SAMPLERS:
        raise ParameterError("sampler", sampler, f"choose one of: {', '.join(SAMPLERS)}")
    if batch < 1:
        raise ParameterError("batch", batch, "must be at least 1")
    if labels is not None and len(labels) != len(seeds):
        raise UserError(f"got {len(labels)} labels for {len(seeds)} samples; give one per sample")
    sigmas = sampling_sigmas(denoiser, steps, sigma_min, sigma_max, rho)
    label_dim = read_protocol(denoiser).label_dim
    out = []
    for i in progress_bar(range(0, len(seeds), batch), enabled=progress, unit="batch"):
        streams = SeedStreams(seeds[i : i + batch], device)
        x_T = streams.randn(shape).to(torch.float64) * float(sigmas[0])
        drawn = streams.randint(label_dim) if label_dim else None  # EDM draws it after x_T
        y = drawn if labels is None else labels[i : i + batch].to(device)
        x = _integrate(denoiser, x_T, sigmas, y, sampler == "heun", churn=churn,
                       randn_like=streams.randn_like, callback=callback, dtype=dtype)  # fmt: skip
        out.append(x.float().cpu())
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
