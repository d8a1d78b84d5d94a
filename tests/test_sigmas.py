"""The one σ-matching tolerance (`lossfloor.sigmas`) and the places that match σ through it."""

from __future__ import annotations

import numpy as np
import pytest

from lossfloor.errors import ParameterError
from lossfloor.optimal.curve import Curve, CurvePoint
from lossfloor.optimal.precision import check_sigmas
from lossfloor.scaling import RunRow, fit_scaling
from lossfloor.sigmas import SIGMA_RTOL, same_sigma

#: Inside and outside the tolerance, relative to 1.
INSIDE, OUTSIDE = 0.5 * SIGMA_RTOL, 4 * SIGMA_RTOL


def test_a_sigma_a_few_ulps_off_is_the_same_sigma():
    # 100.00000000000013: the last σ of the grid string 0.01:100:7 as parsed, 9 ulps off 100
    assert same_sigma(100.00000000000013, 100.0)
    assert same_sigma(np.nextafter(0.05, 1.0), 0.05)


def test_sigmas_beyond_the_tolerance_are_distinct():
    assert same_sigma(2.0 * (1 + INSIDE), 2.0)
    assert not same_sigma(2.0 * (1 + OUTSIDE), 2.0)
    assert not same_sigma(0.5, 0.5 * (1 + 1e-6))  # the old scaling tolerance no longer matches


def test_a_grid_with_two_sigmas_within_the_tolerance_is_refused():
    check_sigmas([1.0, 1.0 * (1 + OUTSIDE)])  # distinct σ, accepted
    with pytest.raises(ParameterError, match="twice"):
        check_sigmas([0.5, 1.0, 1.0 * (1 + INSIDE)])


def _curve() -> Curve:
    return Curve(points=tuple(CurvePoint(sigma=s, optimal_loss=0.1 * s) for s in (0.5, 2.0, 8.0)))


def test_a_curve_finds_its_point_and_covers_its_grid_within_the_tolerance():
    curve = _curve()
    assert curve.point_at(2.0 * (1 + INSIDE)) is curve.points[1]
    assert curve.point_at(2.0 * (1 + OUTSIDE)) is None
    assert float(curve(8.0 * (1 + INSIDE))) == pytest.approx(0.8)
    with pytest.raises(Exception, match="outside"):
        curve(8.0 * (1 + OUTSIDE))


def test_scaling_selects_the_rows_sigma_within_the_same_tolerance():
    rows = [
        RunRow(run=f"r{i}", params=1e3, flops=f, images_seen=f, sigma=2.0, loss=0.2 + f**-0.5)
        for i, f in enumerate((1e6, 1e7, 1e8, 1e9))
    ]
    fit = fit_scaling(rows, _curve(), sigmas=[2.0 * (1 + INSIDE)])
    assert [f.sigma for f in fit.fits] == [2.0]
    with pytest.raises(ParameterError, match="no rows at this σ"):
        fit_scaling(rows, _curve(), sigmas=[2.0 * (1 + OUTSIDE)])
