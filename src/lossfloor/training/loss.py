"""Training objectives, in the style of EDM's ``training/loss.py``: a callable that draws σ, noises
the batch and returns per-sample losses.

  loss_i = w(σ_i) · mean_elements (D(x0_i + σ_i·ε_i, σ_i, y_i) − x0_i)²,  σ_i ~ p(σ), ε_i ~ N(0, I)

in VE σ and x0 units (docs/method.md §1): with the schedule's weight equal to a target's loss
factor this is that target's loss (EDM's λ = 1/c_out² makes it the F loss). The trainer minimises
the batch mean. Any schedule works, including one built from data (an optimal-loss ``Curve``, a
measured gap): construct it and pass ``DenoisingLoss(schedule)`` to the trainer.

An objective whose state changes during training (e.g. an online gap estimate) returns that state
from ``state_dict()`` (tensors, numbers, lists, dicts: what ``torch.load(weights_only=True)``
reads) and takes it back in ``load_state_dict()``; the trainer saves it in every checkpoint, so
a resumed run stays bitwise the uninterrupted one. ``DenoisingLoss`` itself carries the state of
a schedule that learns from the training losses (``OptimalLossSchedule`` with gap="online"); the
schedule learns through a hook (``hooks()``: ``OnlineGap``, which the trainer hands each batch's
σ and per-sample x0 losses after the step, so the next batch's σ are drawn from the updated
density), and calling the objective leaves it as it is.

An objective with learnable parameters (``UncertaintyLoss``: EDM2's learned per-σ uncertainty
weighting) exposes them through ``parameters()``; the trainer optimises them with the network
(same AdamW, learning rate and gradient clipping) and checkpoints them with the objective's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.errors import UserError
from lossfloor.schedules import NoiseSchedule, OptimalLossSchedule, get_schedule
from lossfloor.seeding import Stream, generator_for
from lossfloor.training.hooks import Batch, Hook

Tensor = torch.Tensor


def _learns_online(schedule: NoiseSchedule) -> TypeGuard[OptimalLossSchedule]:
    """Whether the schedule learns from the training losses (an online gap)."""
    return isinstance(schedule, OptimalLossSchedule) and schedule.online


class OnlineGap(Hook):
    """The optimal schedule's online gap as a hook: each batch's σ and per-sample x0 losses go
    to ``schedule.observe`` (method in ``schedules.optimal``). Its state is the schedule's,
    checkpointed with the objective that holds it (``DenoisingLoss.state_dict()["schedule"]``),
    so the hook itself has none."""

    def __init__(self, schedule: OptimalLossSchedule) -> None:
        self.schedule = schedule

    def on_batch(self, batch: Batch) -> None:
        self.schedule.observe(batch.sigma, batch.loss_x0)


@dataclass(frozen=True)
class Losses:
    """One batch: ``loss`` = w(σ)·``loss_x0`` per sample (what is minimised), ``loss_x0`` the
    per-sample x0 loss (x0's device and dtype) and the σ drawn (float64, CPU)."""

    loss: Tensor
    loss_x0: Tensor
    sigma: Tensor


class DenoisingLoss:
    """The denoising loss under ``schedule`` (p(σ) and w(σ)); a schedule object, name or config.

    Randomness, in this order: σ from ``g_sigma`` (the schedule's ``sample``), then
    ε = randn(x0.shape) from ``g_noise`` (both for the whole batch under ``part=``), both CPU
    generators.
    """

    def __init__(self, schedule: NoiseSchedule | str | Mapping[str, Any] = "edm") -> None:
        self.schedule = get_schedule(schedule)

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        labels: Tensor | None,
        *,
        g_sigma: torch.Generator,
        g_noise: torch.Generator,
        part: tuple[int, int] | None = None,
    ) -> Losses:
        """Per-sample losses of the batch x0 (N×…) with optional labels.

        ``part=(start, total)``: x0 is rows start…start+N−1 of a batch of ``total`` split across
        processes (data-parallel training); σ and ε are drawn for the whole batch, as one
        process draws them, and these rows' are used, so the draws do not depend on the split.
        """
        start, total = (0, len(x0)) if part is None else part
        if len(x0) != total and _learns_online(self.schedule):
            raise UserError(
                "--gap online learns from every row of the batch; with the batch split across "
                "processes it would learn from this process's rows only: train it in one "
                "process, or give --gap DIAGNOSIS.json"
            )
        rows = slice(start, start + len(x0))
        sigma = self.schedule.sample(total, g_sigma)[rows]
        weight = self.schedule.weight(sigma).to(x0.device, x0.dtype)
        eps = torch.randn((total, *x0.shape[1:]), generator=g_noise)[rows].to(x0.device)
        s = sigma.to(x0.device, x0.dtype)
        x = x0 + s.view(-1, *[1] * (x0.ndim - 1)) * eps
        loss_x0 = (denoiser(x, s, labels) - x0).square().mean(dim=tuple(range(1, x0.ndim)))
        return Losses(weight * loss_x0, loss_x0, sigma)

    def hooks(self) -> list[Hook]:
        """The hooks the trainer must feed for this objective: ``OnlineGap`` of a schedule
        that learns online, else none."""
        return [OnlineGap(self.schedule)] if _learns_online(self.schedule) else []

    def check(self, denoiser: Denoiser) -> None:
        """UserError unless the schedule is consistent with the denoiser's process, target and
        σ_data (``lossfloor.schedules.base``)."""
        self.schedule.check(denoiser.process, denoiser.target, denoiser.sigma_data)

    def state_dict(self) -> dict[str, Any]:
        """The state that changes during training: the schedule's, if it has any."""
        own = getattr(self.schedule, "state_dict", None)
        state = own() if own is not None else {}
        return {"schedule": state} if state else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s state."""
        load = getattr(self.schedule, "load_state_dict", None)
        if load is not None and set(state) <= {"schedule"}:
            load(state.get("schedule", {}))
        elif state:
            raise UserError(
                f"{type(self).__name__} has no state, but the checkpoint holds {sorted(state)}; "
                "resume with the objective the run was trained with"
            )


class LogVarianceNet(torch.nn.Module):
    """EDM2's learned log-variance u(σ) (Karras et al. 2024, "Analyzing and improving the training
    dynamics", the ``logvar`` head): Fourier features of c_noise = ln σ / 4,

      φ_j(σ) = √2·cos(2π(f_j·c_noise + φ0_j)),  f_j ~ N(0, 1), φ0_j ~ U(0, 1)  (fixed by ``seed``),

    and a linear map u(σ) = Σ_j a_j φ_j(σ) + b. Unlike EDM2 (a magnitude-preserving layer with
    random weights, no bias) a and b start at 0, so u ≡ 0 and training starts as the plain loss.
    """

    freqs: Tensor  # the buffers f_j and φ0_j
    phases: Tensor

    def __init__(self, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        if channels < 1:
            raise UserError(f"the uncertainty net needs at least 1 Fourier channel, not {channels}")
        g = generator_for(seed, Stream.UNCERTAINTY)
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = torch.nn.Linear(channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def features(self, sigma: Tensor) -> Tensor:
        """The N×channels Fourier features of σ (any device; computed in float64, returned in
        the buffers' dtype on their device)."""
        c = sigma.double().log().div(4).to(self.freqs.device).view(-1, 1)
        arg = c * self.freqs.double() + self.phases.double()
        return (torch.cos(2 * torch.pi * arg) * 2**0.5).to(self.freqs.dtype)

    def forward(self, sigma: Tensor) -> Tensor:
        """u(σ_i) for each σ_i (N values)."""
        return self.linear(self.features(sigma)).squeeze(-1)


class UncertaintyLoss(DenoisingLoss):
    """EDM2's learned uncertainty weighting on top of ``schedule``:

      loss_i = w(σ_i)·L_i / e^{u(σ_i)} + u(σ_i),   L_i the per-sample x0 loss,

    u a ``LogVarianceNet`` trained jointly with the network. For a fixed σ the expectation
    e^{−u}·E[w·L] + u is minimised at u = ln E[w·L(σ)], where it equals 1 + ln E[w·L]: u learns
    the log of the weighted loss per σ, and each σ's loss is divided by its own running level
    (every σ contributes ≈ 1 to the gradient scale, whatever the weight and the difficulty).
    The draws are ``DenoisingLoss``'s (the same σ and ε for the same generators).
    """

    def __init__(
        self,
        schedule: NoiseSchedule | str | Mapping[str, Any] = "edm",
        *,
        channels: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__(schedule)
        self.logvar = LogVarianceNet(channels, seed)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The learnable parameters (optimised by the trainer with the network's)."""
        return list(self.logvar.parameters())

    def to(self, device: str | torch.device) -> UncertaintyLoss:
        """Move u's parameters and buffers to ``device``."""
        self.logvar.to(device)
        return self

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        labels: Tensor | None,
        *,
        g_sigma: torch.Generator,
        g_noise: torch.Generator,
        part: tuple[int, int] | None = None,
    ) -> Losses:
        """``DenoisingLoss``'s losses, reweighted: w·L/e^u + u per sample."""
        out = super().__call__(denoiser, x0, labels, g_sigma=g_sigma, g_noise=g_noise, part=part)
        u = self.logvar(out.sigma).to(out.loss.device, out.loss.dtype)
        return Losses(out.loss * torch.exp(-u) + u, out.loss_x0, out.sigma)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (if any) and u's parameters and Fourier buffers."""
        own = {k: v.detach().clone() for k, v in self.logvar.state_dict().items()}
        return {**super().state_dict(), "uncertainty": own}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s state."""
        rest = dict(state)
        own = rest.pop("uncertainty", None)
        if own is None:
            raise UserError(
                "the checkpoint holds no learned uncertainty weighting; resume with the "
                "objective the run was trained with (without --uncertainty)"
            )
        self.logvar.load_state_dict(own)
        super().load_state_dict(rest)
