"""``GapTracker``: a model's per-σ gap to the optimal loss from the losses a training loop already
computes (no extra forward passes), in any loop: lossfloor's trainer (it is a ``TrainingHook``),
diffusers' scripts under accelerate, Lightning, EDM's loop, a loop of one's own.

Each update takes the per-sample loss as the loop computes it, ℓ_i = mean_elements
(pred − target)² in the target's units (unweighted), and the sample's σ (VE σ̃ = σ_t/α_t) or its
timestep t. The loss becomes x0 units with the target's loss factor (``Target.loss_factor``, a²:
the conversion ``diagnose`` reports), L_i = ℓ_i / a²(t_i), and the gap sample is
y_i = L_i − J*(σ_i), J* the curve's (ln J* linear in ln σ between its points, as the optimal
schedule reads it: ``schedules.optimal``).

Bins are uniform in ln σ over the curve's range (``schedules.bins``: the same decayed sums as
the optimal schedule's online gap). Per bin, with u_i = ln σ_i − (the bin's centre) and decayed
weights w_i (each batch of n multiplies past weights by 2^(−n/h), h = ``half_life`` samples),
it keeps Σw·u^k (k = 0…4), Σw·u^k·y (k = 0…2), Σw·y² and Σw². The gap at u* is the weighted
least-squares quadratic through (u_i, y_i), evaluated at u*: a bin's mean would be biased by the
gap's trend and curvature across the bin (an x0 loss ∝ σ² has mean e^{2u} ≈ 1 + 2·Var(u), +24%
on a bin 1.2 wide in ln σ) and by the density of σ within it. u* = 0 (the centre) unless the
bin's draws lie to one side: u* is the centre clamped to ū ± sd(u). With X the rows (1, u, u²)
and M = Σw·XᵀX/Σw, the standard error is s·√(x*ᵀM⁻¹x*/n_eff), s² the residual mean square
(n_eff − 3 degrees of freedom), n_eff = (Σw)²/Σw² (exactly OLS without decay). Where the draws
hold too few distinct σ for a quadratic (M singular to 1e-9 relative), the line (n_eff − 2), or
with one σ their mean there (n_eff − 1).

summary() rows: sigma (where the row's values hold: e^(centre + u*)), loss (J_θ = J* + gap, x0
units), optimal_loss (J*(σ)), gap, gap_stderr, ratio = loss/optimal_loss (None where J* is 0,
below ``diagnosis.REL_FLOOR`` of the curve's largest J*), count (Σw, the decayed number of
samples). The ratio J_θ/J* is unit-free: comparable across datasets and latent spaces.

Several processes: built with ``reduce=`` (a ``training.hooks.Reducer``: a
``lossfloor.distributed.Group``, or "auto" for torch.distributed's default group), each update
decays by the global batch (n·world), and ``summary``/``log_dict``/``state_dict`` sum the bins
over the processes (collectives: call them on every process; rank 0 logs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lossfloor.diagnosis import REL_FLOOR
from lossfloor.diffusion.processes import Process, get_process
from lossfloor.diffusion.schedulers import scheduler_units
from lossfloor.diffusion.targets import Target, get_target
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.curve import Curve
from lossfloor.schedules.bins import bin_index, decay, decayed_add, log_edges
from lossfloor.schedules.tabulated import _interp_ln
from lossfloor.sigmas import SIGMA_RTOL
from lossfloor.training.hooks import Batch, Hook, LogStep, Reducer

Tensor = torch.Tensor

#: The moment columns kept per bin (weights w decayed; Σw² decays with d², kept apart).
MOMENTS = ("w", "wu", "wu2", "wu3", "wu4", "wy", "wuy", "wu2y", "wyy")


def _fingerprint(data: Any) -> str | None:
    """The sha256 of a Dataset, of its ``describe()`` dict, or a sha256 string."""
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, Mapping):
        return data.get("sha256")
    return getattr(data, "sha256", None)


class GapTracker(Hook):
    """The per-σ gap J_θ(σ) − J*(σ) from a loop's own per-sample losses (module docstring).

    ``curve``: a ``Curve`` or the path of an estimate JSON. The model's units: ``scheduler`` (a
    diffusers scheduler: its ``alphas_cumprod`` gives the discrete VP process, timesteps → σ̃,
    its ``prediction_type`` the target), else ``process`` and ``target`` (names, configs or
    objects; ``sigma_data`` for target F). ``data``: the training data (a Dataset, its
    description or sha256), checked against the curve's. ``bins`` uniform in ln σ over
    ``sigma_range`` (default the curve's); ``half_life`` in samples (math.inf: no decay).
    ``outside``: a σ outside the curve is an error ("error"), or left out and counted in
    ``skipped`` ("skip": for unbounded draws such as EDM's lognormal).
    """

    state_key = "gap_tracker"

    def __init__(
        self,
        curve: Curve | str | os.PathLike[str],
        scheduler: Any = None,
        process: str | Mapping[str, Any] | Process = "edm",
        target: str | Mapping[str, Any] | Target = "F",
        sigma_data: float = 0.5,
        bins: int = 16,
        half_life: float = 10_000,
        *,
        data: Any = None,
        sigma_range: tuple[float, float] | None = None,
        reduce: Reducer | str | None = None,
        log_every: int = 0,
        outside: str = "error",
    ) -> None:
        self.curve = curve if isinstance(curve, Curve) else Curve.load(curve)
        mine, theirs = _fingerprint(data), (self.curve.dataset or {}).get("sha256")
        if data is not None and mine != theirs:
            raise UserError(
                f"the optimal-loss curve is of other data than the training data (sha256 "
                f"{str(theirs)[:12]} vs {str(mine)[:12]}); estimate J* on the data you train on"
            )
        if scheduler is not None:
            process, target = scheduler_units(scheduler, "GapTracker")
        self.process = get_process(process)
        self.target = get_target(target, sigma_data)
        if not (isinstance(bins, int) and bins >= 1):
            raise ParameterError("bins", bins, "must be an integer ≥ 1")
        if not 0 < half_life <= math.inf:
            raise ParameterError("half_life", half_life, "must be > 0 samples (inf: no decay)")
        self._s, self._j = self.curve.sigmas, np.maximum(self.curve.values, 0.0)
        lo, hi = (float(self._s[0]), float(self._s[-1])) if sigma_range is None else sigma_range
        if not (self._s[0] * (1 - SIGMA_RTOL) <= lo < hi <= self._s[-1] * (1 + SIGMA_RTOL)):
            raise ParameterError(
                "sigma_range", (lo, hi), f"must lie in the curve's [{self._s[0]:g}, "
                f"{self._s[-1]:g}] with lo < hi",
            )  # fmt: skip
        self.bins, self.half_life, self.log_every = bins, float(half_life), log_every
        self.edges = log_edges(lo, hi, bins)
        self.centres = 0.5 * (self.edges[1:] + self.edges[:-1])
        if reduce == "auto":
            from lossfloor.distributed import current

            reduce = current(_collective_device())
        self.reducer = reduce if isinstance(reduce, Reducer) else None
        if reduce is not None and self.reducer is None:
            raise ParameterError("reduce", reduce, 'must be None, "auto" or a Reducer')
        if outside not in ("error", "skip"):
            raise ParameterError("outside", outside, 'must be "error" or "skip"')
        self.outside, self.skipped = outside, 0
        self._top = float(self._j.max())
        self.reset()

    def reset(self) -> None:
        """Forget every observation."""
        self._m = torch.zeros(self.bins, len(MOMENTS), dtype=torch.float64)
        self._w2 = torch.zeros(self.bins, dtype=torch.float64)

    # ----- units -----------------------------------------------------------------------------
    def optimal_loss(self, sigma: float | Tensor) -> Tensor:
        """J*(σ) of the curve (ln J* linear in ln σ between points where both are > 0)."""
        return _interp_ln(torch.as_tensor(sigma, dtype=torch.float64), self._s, self._j, True)

    def to_x0(
        self, loss: Tensor, sigma: Tensor | None = None, timesteps: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(σ̃, the x0-unit losses L = ℓ/a²) of per-sample target-unit losses ℓ (float64, CPU)."""
        if not isinstance(loss, Tensor) or loss.ndim != 1 or loss.numel() == 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise UserError(
                f"GapTracker.update takes the per-sample loss, shape (B,), not {shape}: the "
                "unweighted MSE in the target's units, mean over the other dimensions"
            )
        if (sigma is None) == (timesteps is None):
            raise UserError("GapTracker.update needs sigma= or timesteps= (one of them)")
        given = sigma if sigma is not None else timesteps
        v = torch.as_tensor(given).detach().to("cpu", torch.float64).reshape(-1)
        if v.numel() == 1 and loss.numel() > 1:
            v = v.expand(loss.numel())
        if v.numel() != loss.numel():
            name = "sigma" if sigma is not None else "timesteps"
            raise UserError(f"GapTracker.update: {v.numel()} {name} for {loss.numel()} losses")
        if timesteps is not None:
            lo_t, hi_t = self.process.t_min, self.process.t_max
            if bool(((v < lo_t) | (v > hi_t)).any()):
                raise UserError(
                    f"timesteps outside the process's [{lo_t:g}, {hi_t:g}] (first: "
                    f"{float(v[(v < lo_t) | (v > hi_t)][0]):g})"
                )
        t = self.process.t_of_sigma_ve(v) if sigma is not None else v
        s = v if sigma is not None else self.process.sigma_ve(t)
        lo, hi = self._s[0] * (1 - SIGMA_RTOL), self._s[-1] * (1 + SIGMA_RTOL)
        outside = (s < lo) | (s > hi) | ~torch.isfinite(s)
        if bool(outside.any()) and self.outside == "error":
            bad = float(s[outside][0])
            raise UserError(
                f"σ = {bad:.4g} lies outside the optimal-loss curve's [{self._s[0]:.4g}, "
                f"{self._s[-1]:.4g}]; estimate J* over the σ range you train on (or build the "
                'tracker with outside="skip")'
            )
        ell = loss.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(ell).all()):
            raise UserError("GapTracker.update: a loss is not finite (NaN or inf)")
        self.skipped += int(outside.sum())
        keep = ~outside
        return s[keep], ell[keep] / self.target.loss_factor(t[keep], self.process)

    # ----- observations ----------------------------------------------------------------------
    def update(
        self, loss: Tensor, sigma: Tensor | None = None, timesteps: Tensor | None = None
    ) -> None:
        """Add a batch: per-sample losses (B,) in the target's units, unweighted MSE mean over
        elements, at σ (VE, (B,) or one) or at timesteps (the process's t; a scheduler's)."""
        s, loss_x0 = self.to_x0(loss, sigma, timesteps)
        self.update_x0(s, loss_x0)

    def update_x0(self, sigma: Tensor, loss_x0: Tensor) -> None:
        """Add a batch already in VE σ and x0 units (what ``training.hooks.Batch`` holds); σ
        outside the bins' range are left out (a trainer's draws may reach past the curve).
        The decay counts the whole batch."""
        s = torch.as_tensor(sigma).detach().to("cpu", torch.float64).reshape(-1)
        loss = loss_x0.detach().to("cpu", torch.float64).reshape(-1)
        n = len(s) * (self.reducer.world if self.reducer is not None else 1)
        log_s = s.log()
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        inside = (log_s >= lo - SIGMA_RTOL) & (log_s <= hi + SIGMA_RTOL)
        s, loss, log_s = s[inside], loss[inside], log_s[inside]
        y = loss - self.optimal_loss(s)
        k = bin_index(log_s, self.edges)
        u = log_s - self.centres[k]
        one, u2 = torch.ones_like(u), u * u
        cols = torch.stack([one, u, u2, u2 * u, u2 * u2, y, u * y, u2 * y, y * y], dim=1)
        d = decay(n, self.half_life)
        self._m = decayed_add(self._m, k, cols, d)
        self._w2 = decayed_add(self._w2, k, torch.ones_like(u), d * d)

    def on_batch(self, batch: Batch) -> None:
        """As a training hook: the batch's σ and x0 losses."""
        self.update_x0(batch.sigma, batch.loss_x0)

    def on_log(self, log: LogStep) -> dict[str, Any]:
        """As a training hook: ``log_dict()`` on the main process."""
        values = self.log_dict()
        return values if log.main else {}

    # ----- results -----------------------------------------------------------------------------
    def _reduced(self) -> tuple[Tensor, Tensor]:
        """The bins' sums, summed over the processes when built with ``reduce``."""
        m, w2 = self._m.clone(), self._w2.clone()
        if self.reducer is None or self.reducer.world == 1:
            return m, w2
        flat = torch.cat([m.reshape(-1), w2])
        device = getattr(self.reducer, "device", torch.device("cpu"))
        flat = self.reducer.sum(flat.to(device)).cpu()
        return flat[: m.numel()].reshape(m.shape), flat[m.numel() :]

    def summary(self) -> list[dict[str, Any]]:
        """One row per bin (module docstring); a bin without samples has loss, gap, … None."""
        m, w2 = self._reduced()
        rows = []
        for k in range(self.bins):
            centre = float(self.centres[k])
            w = float(m[k, 0])
            if w <= 0:
                rows.append(_empty_row(math.exp(centre)))
                continue
            n_eff = w * w / float(w2[k]) if w2[k] > 0 else 0.0
            gap, var, at = _local_fit(m[k].numpy() / w, n_eff)
            sigma = math.exp(centre + at)
            opt = float(self.optimal_loss(sigma))
            loss = opt + gap
            ratio = loss / opt if opt > REL_FLOOR * self._top and opt > 0 else None
            rows.append({"sigma": sigma, "loss": loss, "optimal_loss": opt, "gap": gap,
                         "gap_stderr": math.sqrt(var) if math.isfinite(var) else None,
                         "ratio": ratio, "count": w})  # fmt: skip
        return rows

    def log_dict(
        self, prefix: str = "", rows: list[dict[str, Any]] | None = None
    ) -> dict[str, float]:
        """{f"{prefix}gap/sigma={σ:.3g}": gap, f"{prefix}ratio/sigma={σ:.3g}": ratio} of the bins
        with samples, keyed by the bin centre (stable names across logs): what
        accelerate's ``log``, W&B and TensorBoard take. ``rows``: a ``summary()`` already
        taken (else it is taken here)."""
        out = {}
        for k, row in enumerate(self.summary() if rows is None else rows):
            if row["gap"] is None:
                continue
            name = f"sigma={math.exp(float(self.centres[k])):.3g}"
            out[f"{prefix}gap/{name}"] = row["gap"]
            if row["ratio"] is not None:
                out[f"{prefix}ratio/{name}"] = row["ratio"]
        return out

    # ----- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The bins' decayed sums (this process's) and their ln σ edges."""
        return {"moments": self._m.clone(), "w2": self._w2.clone(), "edges": self.edges.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s sums (refused for other bins)."""
        if set(state) != {"moments", "w2", "edges"}:
            raise UserError(f"not a GapTracker state (keys {sorted(state)})")
        edges = torch.as_tensor(state["edges"], dtype=torch.float64)
        if edges.shape != self.edges.shape or not torch.allclose(edges, self.edges, rtol=1e-12):
            raise UserError("the saved GapTracker state has other σ bins than this tracker")
        self._m = torch.as_tensor(state["moments"], dtype=torch.float64).clone()
        self._w2 = torch.as_tensor(state["w2"], dtype=torch.float64).clone()


def _local_fit(moments: np.ndarray, n_eff: float) -> tuple[float, float, float]:
    """(the fit at u*, its variance, u*) from one bin's normalised moments E_w[u^k] (k = 0…4),
    E_w[u^k·y] (k = 0…2), E_w[y²] (module docstring): the quadratic, else the line, else the
    mean, whichever the draws' distinct σ determine."""
    pu, py, yy = moments[:5], moments[5:8], float(moments[8])
    mean_u = float(pu[1])
    sd = math.sqrt(max(float(pu[2]) - mean_u**2, 0.0))
    at = min(max(0.0, mean_u - sd), mean_u + sd)
    size = 1
    for degree in (2, 1):  # the highest degree whose normal equations are well posed
        gram = np.array([[pu[i + j] for j in range(degree + 1)] for i in range(degree + 1)])
        scale = np.sqrt(np.diag(gram))
        if np.all(scale > 0) and np.linalg.cond(gram / np.outer(scale, scale)) < 1e9:
            size = degree + 1
            break
    if size == 1:
        at = mean_u  # one σ: the mean holds there
    gram = np.array([[pu[i + j] for j in range(size)] for i in range(size)])
    x_at = np.array([at**i for i in range(size)])
    beta = np.linalg.solve(gram, py[:size])
    resid, dof = max(yy - float(beta @ py[:size]), 0.0), n_eff - size
    var = resid / dof * float(x_at @ np.linalg.solve(gram, x_at)) if dof > 0 else math.nan
    return float(beta @ x_at), var, at


def _empty_row(sigma: float) -> dict[str, Any]:
    keys = ("loss", "optimal_loss", "gap", "gap_stderr", "ratio")
    return {"sigma": sigma, **dict.fromkeys(keys), "count": 0.0}


def _collective_device() -> torch.device:
    """Where torch.distributed's default group reduces: this process's GPU under NCCL."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
