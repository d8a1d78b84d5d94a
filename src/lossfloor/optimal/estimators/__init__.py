"""Estimators of the posterior mean μ(x_t) = E[x0 | x_t] of an empirical dataset
(docs/method.md §3).

All of them are softmaxes of the one kernel (``kernel.py``) over different inner sets:

- ``full``  all N points: the exact posterior.
- ``snis``  L random points (self-normalised importance sampling).
- ``dol``   the source x0 that produced x_t plus L−1 random points.
- ``stratified``  the source and its nearest neighbours exactly, plus L random points weighted
            by their inverse inclusion probability N/L (``Stratified``).
- ``cdol``  as ``dol`` with the source's kernel weight divided by C (reconstructed):
            μ = (k_s/C·x_s + Σ_{j∈R} k_j x_j) / (k_s/C + Σ_{j∈R} k_j).
            C = 1 is DOL; C = ∞ is SNIS on the L−1 random points, exactly, on the same draws.

``gram`` (``gram.py``) is the exception: the exact weights of a whole σ grid from two Gram
products per block of draws, the rest of the posterior by weight-proportional draws.

Random inner sets come in two layouts: ``shared`` (one random set R per block of queries, each
query keeping its own source term: the inner sums are GEMMs) and ``independent`` (each query its
own R: memory-bound gathers). ``exclude_source`` keeps the query's own source out of R (with a
shared R, the source is masked and a spare point takes its place, so every query sees exactly
L−1 random points when sampling without replacement).

Each is a class registered in ``ESTIMATORS`` under its name, built from keyword parameters
(``ESTIMATORS.create("cdol", inner=180, C=40.0)``) with a ``to_config()`` / ``from_config()``
round trip. Each declares what it can do on its class (``capabilities``: where it runs, its
draws and forms, what it needs; ``capabilities.py``) and the defaults that depend on the pool
size N (``defaults_for``); ``make_estimator(name, n, ...)`` builds one from those alone.

The package: ``base.py`` (``PerSample``, ``Estimator``, ``ESTIMATORS`` and what reads it:
``make_estimator``, ``as_estimator``, ``declared``), ``full.py``, ``random_sets.py`` (``Subset``:
``SNIS``, ``DOL``, ``CDOL``, ``resolve_C``) and ``stratified.py``; importing it registers
them in this order.
"""

from lossfloor.optimal.estimators.base import (
    ESTIMATORS,
    NOT_GIVEN,
    Estimator,
    EstimatorSpec,
    PerSample,
    as_estimator,
    declared,
    make_estimator,
)
from lossfloor.optimal.estimators.full import Full
from lossfloor.optimal.estimators.random_sets import CDOL, DOL, SNIS, Subset, resolve_C
from lossfloor.optimal.estimators.stratified import STRATIFIED_NEAR, Stratified

__all__ = [
    "CDOL",
    "DOL",
    "ESTIMATORS",
    "NOT_GIVEN",
    "SNIS",
    "STRATIFIED_NEAR",
    "Estimator",
    "EstimatorSpec",
    "Full",
    "PerSample",
    "Stratified",
    "Subset",
    "as_estimator",
    "declared",
    "make_estimator",
    "resolve_C",
]
