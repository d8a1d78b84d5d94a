"""``lossfloor estimators``: the table users read is the estimators' declared capabilities."""

from __future__ import annotations

import json

import lossfloor.cli
from lossfloor.optimal.capabilities import PLACE_TEXT, PLACES
from lossfloor.optimal.estimators import ESTIMATORS, declared


def test_the_listing_and_its_json_are_the_declared_capabilities(tmp_path, capsys):
    out = tmp_path / "estimators.json"
    assert lossfloor.cli.main(["estimators", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert list(got) == list(ESTIMATORS.names)
    for name, caps in declared().items():
        d = got[name]
        assert set(d["runs_on"]) == caps.runs_on
        assert d["not_on"] == {p: caps.why_not[p] for p in PLACES if p not in caps.runs_on}
        assert (set(d["draws"]), d["default_draws"]) == (caps.draws, caps.default_draws)
        assert (set(d["forms"]), d["default_form"]) == (caps.forms, caps.default_form)
        assert set(d["options"]) == caps.options
        flags = ("needs_neighbours", "sweeps_grid", "adapts_inner", "exact")
        assert all(d[f] == getattr(caps, f) for f in flags)
        block = text.split(f"\n{name}: ")[1] if not text.startswith(f"{name}: ") else text
        block = block.split("\n\n")[0]
        runs = next(line for line in block.splitlines() if line.startswith("  runs on"))
        assert all(PLACE_TEXT[p] in runs for p in caps.runs_on)
        for place, why in d["not_on"].items():
            assert f"  not on    {PLACE_TEXT[place]}: {why}" in block


def test_an_option_is_named_as_estimate_takes_it(capsys):
    """cdol's exclude_source is set by estimate's --source-in-random, not --exclude-source."""
    lossfloor.cli.main(["estimators"])
    block = capsys.readouterr().out.split("cdol: ")[1].split("\n\n")[0]
    assert "--source-in-random" in block and "--exclude-source" not in block


def test_estimate_names_source_in_random_when_full_is_given_it(capsys):
    """A parameter the estimator does not take is reported under estimate's option for it."""
    argv = ["estimate", "--data", "digits", "--sigmas", "1", "--source-in-random", "no"]
    assert lossfloor.cli.main([*argv, "--outer", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lossfloor: error: --source-in-random: applies to snis, dol and cdol")
