"""The floor applied to a curve and to a model: a J* curve with held-out losses
(``with_heldout``), a model's held-out loss and the reading of its gap through the floor's
bracket (``read_heldout``, ``reading``), and the checks that a floor fits the data and grid
(``check_floor``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from lossfloor.data import Dataset
from lossfloor.errors import ParameterError
from lossfloor.floor.heldout import check_heldout, check_same_kind, heldout_losses
from lossfloor.floor.result import Floor, FloorPoint
from lossfloor.optimal.curve import Curve
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.moments import mean_and_stderr
from lossfloor.optimal.precision import Precision

if TYPE_CHECKING:
    from lossfloor.diagnosis import Diagnosis, GapPoint

Tensor = torch.Tensor


def with_heldout(
    curve: Curve,
    train: Dataset,
    heldout: Dataset,
    *,
    outer: int | None = None,
    bandwidth: float | str | None = None,
    precision: Precision = "auto",
    device: str | torch.device = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
    progress: bool = False,
) -> Curve:
    """``curve`` (J* of ``train``) with each point's held-out losses (``heldout_losses`` with
    the curve's seed; M = ``outer``, default the held-out size) and ``sources`` = the held-out
    dataset's description. Of Gaussian items both sets are (``heldout.check_same_kind``)."""
    if curve.dataset is not None and curve.dataset.get("conditional"):
        raise ParameterError("sources", heldout.name, "held-out sources need an unconditional J*")
    held = heldout_losses(
        train.x,
        heldout.x,
        [p.sigma for p in curve.points],
        outer=outer,
        seed=curve.seed or 0,
        bandwidth=bandwidth,
        precision=precision,
        device=device,
        tile_bytes=tile_bytes,
        progress=progress,
        train_std=train.std,
        heldout_std=heldout.std,
    )
    points = tuple(
        dataclasses.replace(p, **{k: v for k, v in h.to_json().items() if k != "sigma"})
        for p, h in zip(curve.points, held, strict=True)
    )
    return dataclasses.replace(curve, points=points, sources=heldout.describe())


#: Readings of a gap against a floor (``read_heldout``).
READINGS = ("underfitting", "provable headroom", "within the bracket")


def reading(point: GapPoint, heldout: tuple[float, float], at: FloorPoint) -> str:
    """The gap at σ read through the floor: ``underfitting`` where J* is converged in N and the
    gap exceeds 2 standard errors (J*_train ≈ J*_pop, so the gap is headroom a model can
    reach); ``provable headroom`` where the model's held-out loss exceeds the least held-out
    bound by 2 standard errors (another fixed denoiser generalises better); otherwise
    ``within the bracket`` (the headroom is at most the model's held-out loss − J*_train)."""
    if at.converged and point.gap > 2 * point.gap_stderr:
        return READINGS[0]
    loss, se = heldout
    if loss - at.upper > 2 * math.hypot(se, at.upper_stderr):
        return READINGS[1]
    return READINGS[2]


def check_floor(result: Floor, dataset: Dataset, sigmas: Sequence[float]) -> None:
    """A floor of this dataset with a point at every σ of the grid."""
    if result.dataset.get("sha256") != dataset.sha256:
        raise ParameterError("floor", result.dataset.get("name"), "is the floor of other data")
    missing = [s for s in sigmas if result.at(s) is None]
    if missing:
        raise ParameterError("floor", f"σ = {missing[0]:g}", "has no point at this σ of the grid")


def read_heldout(
    diagnosis: Diagnosis,
    model: Callable[..., Tensor],
    train: Dataset,
    heldout: Dataset,
    *,
    floor_result: Floor | None = None,
    batch: int = 256,
    use_labels: bool = False,
    device: str | torch.device = "cpu",
) -> Diagnosis:
    """``diagnosis`` with each point's held-out model loss E‖D_θ(x0_h + σε) − x0_h‖²/D (draws
    as the diagnosis': outer M and seed, over ``heldout``) and, with the floor of ``train``, its
    ``reading``. Of Gaussian items (both sets: ``heldout.check_same_kind``) each held-out
    x0 = m + s⊙z is drawn as the diagnosis draws it."""
    from lossfloor.diagnosis import model_per_sample_loss

    check_heldout(train.x, heldout.x)
    check_same_kind(train.std, heldout.std)
    if floor_result is not None:
        check_floor(floor_result, train, [p.sigma for p in diagnosis.points])
    if use_labels and heldout.labels is None:
        raise ParameterError("heldout", heldout.name, "has no labels for a conditional model")
    plan = OuterPlan.build(heldout.x, heldout.labels, diagnosis.outer, diagnosis.seed, False,
                           heldout.std)  # fmt: skip
    labels = heldout.labels if use_labels else None
    points = []
    for p in diagnosis.points:
        per = model_per_sample_loss(
            model, heldout, plan, p.sigma, batch, torch.device(device), labels
        )
        loss = mean_and_stderr(per)
        at = None if floor_result is None else floor_result.at(p.sigma)
        read = None if at is None else reading(p, loss, at)
        points.append(
            dataclasses.replace(
                p, heldout_model_loss=loss[0], heldout_model_loss_stderr=loss[1], reading=read
            )
        )
    return dataclasses.replace(diagnosis, points=tuple(points), heldout=heldout.describe())
