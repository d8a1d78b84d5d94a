"""The model's side of a diagnosis: its per-sample loss ‖D_θ(x0 + σε, σ) − x0‖²/D on the outer
draws, its loss factor (target units / x0 units), and the σ it accepts (its declared range, and
an input x0 + σε that does not overflow the data's dtype)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import read_protocol
from lossfloor.errors import ParameterError
from lossfloor.optimal.blocks import outer_blocks
from lossfloor.optimal.draws import OuterPlan

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]

#: |ε| bound used for the model input's range: P(|ε| > 10) ≈ 1.5e-23 per element.
EPS_BOUND = 10.0


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
    noise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """‖D_θ(x0 + σε, σ) − x0‖²/D for every outer draw of ``plan`` (float64), block by block
    (``blocks.outer_blocks``); ε of block j is ``noise(j)`` (default: the plain ε). Of Gaussian
    items x0 = m + s⊙z with the estimate's z (``Block.component``)."""
    out = torch.empty(plan.outer, dtype=torch.float64)
    for block in outer_blocks(plan.sources, plan.seed, dataset.dim):
        lo, hi = block.lo, block.hi
        eps = block.noise if noise is None else noise(block.index)
        for b in range(lo, hi, batch):
            e = min(hi, b + batch)
            src = plan.sources[b:e]
            x0 = dataset.x[src].to(device)
            if dataset.std is not None:  # in float64, as the mixture pool draws it
                z = block.component[b - lo : e - lo].reshape(x0.shape)
                x0 = (dataset.x[src].double() + dataset.std[src].double() * z).to(x0)
            noise_b = eps[b - lo : e - lo].reshape(x0.shape).to(device=device, dtype=x0.dtype)
            sig = torch.full((e - b,), sigma, dtype=x0.dtype, device=device)
            lab = None if labels is None else labels[src].to(device)
            pred = model(x0 + sigma * noise_b, sig, lab)
            out[b:e] = (pred.double() - x0.double()).pow(2).flatten(1).mean(1).cpu()
    return out


def split_by_range(model: DenoiserFn, sigmas: Sequence[float]) -> tuple[list[float], list[float]]:
    """(the σ of ``sigmas`` within the model's declared range [sigma_min, sigma_max] of EDM's
    protocol, ``read_protocol``; the σ outside it), each in the given order."""
    protocol = read_protocol(model)
    lo, hi = protocol.sigma_min, protocol.sigma_max
    inside = [s for s in sigmas if lo <= s <= hi]
    return inside, [s for s in sigmas if not lo <= s <= hi]


def check_model_sigmas(model: DenoiserFn, sigmas: Sequence[float], dtype: torch.dtype) -> None:
    """Refuse (parameter ``sigmas``) the first σ outside the model's declared range
    (``split_by_range``), then one at which its input x0 + σε would overflow ``dtype``, the
    data's: σ·EPS_BOUND above the dtype's largest value."""
    _, outside = split_by_range(model, sigmas)
    if outside:
        protocol = read_protocol(model)
        reason = f"outside the model's range [{protocol.sigma_min:g}, {protocol.sigma_max:g}]"
        raise ParameterError("sigmas", outside[0], reason)
    top = torch.finfo(dtype).max
    for sigma in sigmas:
        if sigma * EPS_BOUND > top:
            name = str(dtype).removeprefix("torch.")
            raise ParameterError(
                "sigmas", sigma, f"the model's input x0 + σε overflows the data's {name} (max "
                f"{top:.3g}) at this σ; J* there is the data variance (lossfloor data)",
            )  # fmt: skip
