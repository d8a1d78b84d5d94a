"""One process of tests/test_estimator_capabilities.py's torchrun launch: every registered
estimator × {plain, tilted} draws on the data sharded over the processes (``OUT/points.npy``,
written by the test), through ``estimate_curve``; each outcome (the per-σ values, or the
refusal's message) written to ``OUT/result-<rank>.json``.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 capabilities_worker.py
OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lossfloor.distributed import launched
from lossfloor.errors import UserError
from lossfloor.optimal import ESTIMATORS, estimate_curve, make_estimator

#: 64 points in 8 dims, 3 σ from memorised to near the data variance (the test's data).
N, D, SIGMAS = 64, 8, [0.2, 1.0, 5.0]
#: Parameters under which each estimator computes the exact posterior on N points (an inner
#: set of all N points; cdol's source at weight 1); gram keeps its defaults (unbiased, with a
#: sampling error of its own) and so does an estimator not listed here.
EXACT = {
    "snis": {"inner": N},
    "dol": {"inner": N},
    "cdol": {"inner": N, "C": 1},
    "stratified": {"inner": N},
}
DRAWS = ("plain", "tilted")
#: Configurations that sample (their values are random, not the exact posterior's), each run on
#: every place: the random sets are drawn over global indices, so every place computes the same
#: sums as memory, in another order (``test_sampled_configurations_...``). Stratified's far
#: sample and near stratum overlap (the weights and corrections by position); the independent
#: layout gathers each query's own rows (``Pool.rows`` of a B×L index).
SAMPLED = {
    "stratified-partial": ("stratified", {"inner": 16, "near": 6, "share": 8}),
    "snis-independent": ("snis", {"inner": 16, "layout": "independent"}),
    "cdol-independent": ("cdol", {"inner": 16, "layout": "independent"}),
}


def outcome(data, name: str, draws: str, params: dict | None = None) -> dict:
    """{"points": [[closed, closed s.e., direct, direct s.e.] per σ]} of estimator ``name``
    (with ``params``, default ``EXACT``'s) on ``data`` (float64), or {"error": the refusal's
    message}."""
    est = make_estimator(name, N, **(EXACT.get(name, {}) if params is None else params))
    try:
        curve = estimate_curve(
            data, SIGMAS, est, draws=draws, precision="float64", device="cpu", progress=False
        )
    except UserError as exc:
        return {"error": str(exc)}
    return {
        "points": [[p.closed, p.closed_stderr, p.direct, p.direct_stderr] for p in curve.points]
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with launched(torch.device("cpu")) as (group, _):
        x = torch.from_numpy(np.load(out / "points.npy"))
        results = {
            f"{name}/{draws}": outcome(x, name, draws)
            for name in ESTIMATORS.names
            for draws in DRAWS
        }
        for key, (name, params) in SAMPLED.items():
            for draws in DRAWS:
                results[f"{key}/{draws}"] = outcome(x, name, draws, params)
        (out / f"result-{group.rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
