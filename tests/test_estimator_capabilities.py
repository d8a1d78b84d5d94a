"""Each estimator's declared capabilities (``optimal/capabilities.py``) against what it does:
every registered estimator × {in memory, 2 processes, streamed} × {plain, tilted} draws either
runs and agrees with ``full`` on the same draws, or is refused in one line that names the
missing capability and the reason; and the declarations drive the defaults, the parameter
refusals, the diagnosis's choice of curve and the CLI's help.

The 2-process part is one torchrun launch (tests/capabilities_worker.py) that runs every
combination inside its workers.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from capabilities_worker import DRAWS, EXACT, SAMPLED, D, N, outcome
from torchrun import run_workers

import lossfloor.cli
from lossfloor.data.chunked import open_chunked
from lossfloor.errors import ParameterError
from lossfloor.optimal import ESTIMATORS, make_estimator
from lossfloor.optimal.capabilities import PLACES, Capabilities, listed
from lossfloor.optimal.draws import resolve_draws
from lossfloor.optimal.estimators import declared
from lossfloor.optimal.moments import resolve_form

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]
WORKER = Path(__file__).parent / "capabilities_worker.py"
#: Agreement of an estimator configured to compute the exact posterior (``EXACT``) with full on
#: the same draws, in float64: the sums differ only in their order, so their relative rounding
#: is ~N·2^-53 ≈ 1e-14; 1e-9 is far below either's standard error (≥ 1e-4 here) and far above it.
EXACT_RTOL = 1e-9
#: Agreement of an unbiased estimator with its own sampling error (gram): within this many
#: standard errors of the difference, bounded by √(s_a² + s_full²) (the shared outer draws make
#: the difference's error smaller: the bound is conservative, not loose by orders).
STDERRS = 5.0


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> Path:
    """N Gaussian points in D dims (general position), float32, as an .npy file."""
    path = tmp_path_factory.mktemp("capabilities") / "points.npy"
    g = torch.Generator().manual_seed(5)
    np.save(path, (0.5 * torch.randn(N, D, generator=g)).numpy())
    return path


@pytest.fixture(scope="module")
def outcomes(points) -> dict[str, dict[str, dict]]:
    """place → "name/draws" → outcome (``capabilities_worker.outcome``): in memory and
    streamed here, sharded from rank 0 of one launch of 2 processes (rank 1's must be equal)."""
    x = torch.from_numpy(np.load(points))
    found = {"memory": {}, "streamed": {}}
    for name in ESTIMATORS.names:
        for draws in DRAWS:
            found["memory"][f"{name}/{draws}"] = outcome(x, name, draws)
            streamed = open_chunked(str(points), chunk_mb=0.002)  # several chunks of 64 rows
            found["streamed"][f"{name}/{draws}"] = outcome(streamed, name, draws)
    for key, (name, params) in SAMPLED.items():
        for draws in DRAWS:
            found["memory"][f"{key}/{draws}"] = outcome(x, name, draws, params)
            streamed = open_chunked(str(points), chunk_mb=0.002)
            found["streamed"][f"{key}/{draws}"] = outcome(streamed, name, draws, params)
    ranks = run_workers(WORKER, points.parent)
    assert ranks[0] == ranks[1]  # every process has the same numbers and the same refusals
    found["sharded"] = ranks[0]
    return found


def _agrees(name: str, got: list[list[float]], full: list[list[float]]) -> None:
    for (closed, closed_se, direct, direct_se), (f_closed, f_cse, f_direct, f_dse) in zip(
        got, full, strict=True
    ):
        for value, se, ref, ref_se in [
            (closed, closed_se, f_closed, f_cse),
            (direct, direct_se, f_direct, f_dse),
        ]:
            if name in EXACT or name == "full":
                assert value == pytest.approx(ref, rel=EXACT_RTOL, abs=1e-15), name
            else:
                assert abs(value - ref) <= STDERRS * math.hypot(se, ref_se), name


@pytest.mark.slow  # the outcomes: one torchrun launch and every estimator, ~40 s
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("draws", DRAWS)
@pytest.mark.parametrize("name", ESTIMATORS.names)
def test_each_estimator_runs_and_agrees_with_full_or_is_refused_naming_the_capability(
    outcomes, name, draws, place
):
    got = outcomes[place][f"{name}/{draws}"]
    caps = ESTIMATORS.get(name).capabilities
    if place in caps.runs_on:
        assert "error" not in got, got
        _agrees(name, got["points"], outcomes["memory"][f"full/{draws}"]["points"])
    else:
        message = got["error"]
        assert "\n" not in message
        assert f"the {name} estimator does not run on" in message
        assert f"it lacks the capability '{place}': {caps.why_not[place]}" in message


@pytest.mark.slow  # the outcomes: one torchrun launch and every estimator, ~40 s
@pytest.mark.parametrize("place", ["sharded", "streamed"])
@pytest.mark.parametrize("draws", DRAWS)
@pytest.mark.parametrize("key", SAMPLED)
def test_sampled_configurations_give_the_in_memory_values_on_every_place(
    outcomes, key, draws, place
):
    """Random inner sets are drawn over global indices, so sharded and streamed pools compute
    memory's sums in another order (merged states, chunks): in float64 their relative rounding
    is ~N·2^-53 ≈ 1e-14 per sum, so EXACT_RTOL (1e-9) separates rounding from any difference
    of draws or weights, which moves the values by ~their standard error (≥ 1e-4 here)."""
    got, ref = outcomes[place][f"{key}/{draws}"], outcomes["memory"][f"{key}/{draws}"]
    assert "error" not in got and "error" not in ref, (got, ref)
    for row, ref_row in zip(got["points"], ref["points"], strict=True):
        assert row == pytest.approx(ref_row, rel=EXACT_RTOL, abs=1e-15), key


def test_the_independent_layout_is_not_refused_anywhere():
    est = make_estimator("snis", N, inner=N, layout="independent")
    assert all(est.refusal(place) is None for place in PLACES)


@pytest.mark.slow  # the outcomes: one torchrun launch and every estimator, ~40 s
@pytest.mark.parametrize("place", ["sharded", "streamed"])
@pytest.mark.parametrize("draws", DRAWS)
def test_gram_gives_its_in_memory_values_on_two_processes_and_streamed(outcomes, draws, place):
    """Gram's draws of the rest invert the same cumulative weights, in the same global column
    order, with the same uniforms on every place (``gram._shard_split``): the same columns
    but where a uniform falls within the cumulative sums' rounding of a column's edge, ~N·1e-16
    per draw in float64 (N = 64 here: none expected among the 3 σ × 64 × 32 draws). So the
    values are memory's to float64 rounding, EXACT_RTOL as for the sampled configurations;
    a different draw would move a value by ~its standard error (≥ 1e-4 here)."""
    got, ref = outcomes[place][f"gram/{draws}"], outcomes["memory"][f"gram/{draws}"]
    assert "error" not in got and "error" not in ref, (got, ref)
    for row, ref_row in zip(got["points"], ref["points"], strict=True):
        assert row == pytest.approx(ref_row, rel=EXACT_RTOL, abs=1e-15)


def test_the_cli_refuses_what_streaming_lacks_in_one_line(points, capsys):
    base = ["estimate", "--data", str(points), "--stream", "--sigmas", "1", "--quiet"]
    for name, caps in declared().items():
        rc = lossfloor.cli.main([*base, "--estimator", name, "--outer", "8"])
        err = capsys.readouterr().err
        if "streamed" in caps.runs_on:
            assert rc == 0, err
        else:
            assert rc == 2 and err.count("\n") == 1 and "lacks the capability 'streamed'" in err


def test_defaults_of_auto_are_the_declared_ones():
    for name, caps in declared().items():
        est = make_estimator(name, 100)
        assert resolve_draws("auto", est) == caps.default_draws
        assert resolve_form("auto", est) == caps.default_form
        for draws in ("plain", "tilted"):
            assert resolve_draws(draws, est) == draws  # every estimator takes both draws
        assert (est.neighbours_needed > 0) == caps.needs_neighbours
        assert callable(getattr(est, "grid_values", None)) == caps.sweeps_grid
        assert ("inner" in dataclasses.asdict(est)) >= caps.adapts_inner


def test_draws_or_a_form_an_estimator_does_not_take_is_refused(monkeypatch):
    est = make_estimator("full", 10)
    narrow = dataclasses.replace(est.capabilities, forms=frozenset({"combined"}))
    monkeypatch.setattr(type(est), "capabilities", narrow)
    with pytest.raises(ParameterError, match="the full estimator does not take it"):
        resolve_form("closed", est)
    assert resolve_form("combined", est) == "combined"


def test_a_declaration_without_a_reason_for_a_missing_place_is_rejected():
    with pytest.raises(ValueError, match="without a reason"):
        Capabilities(runs_on=frozenset({"memory"}), default_draws="plain", default_form="closed")


def test_a_parameter_an_estimator_does_not_take_is_refused_naming_those_that_do():
    for name, caps in declared().items():
        for param, value in [("near", 3), ("C", 2.0), ("layout", "independent")]:
            if param in caps.options:
                continue
            takers = [n for n, c in declared().items() if param in c.options]
            with pytest.raises(ParameterError, match=f"applies to {takers[0]}"):
                make_estimator(name, 100, **{param: value})


def test_the_cli_help_names_each_estimator_and_the_declared_defaults(capsys):
    """The help is static text (``estimate --help`` imports no torch, and the declarations
    live on the estimator classes, which do): it must say what the declarations say."""
    with pytest.raises(SystemExit):
        lossfloor.cli.main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    tilted = [n for n, c in declared().items() if c.default_draws == "tilted"]
    combined = [n for n, c in declared().items() if c.default_form == "combined"]
    for name in ESTIMATORS.names:
        assert f"{name} (" in text or f"| {name}" in text or f"{name} |" in text, name
    everywhere = [n for n, c in declared().items() if c.runs_on == frozenset(PLACES)]
    assert f"under torchrun and on streamed data: {listed(everywhere)} (" in text
    assert all("memory" in c.runs_on for c in declared().values())
    assert "read from the capabilities declared on its class: lossfloor estimators" in text
    assert f"auto (tilted for {listed(tilted)}, else plain)" in text
    assert f"auto: combined for {', '.join(combined[:-1])} and {combined[-1]}, closed" in text
