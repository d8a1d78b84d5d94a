"""Library errors name parameters; the CLI reports them under its own options."""

from __future__ import annotations

import pytest

from lossfloor.cli import main
from lossfloor.errors import ParameterError, UserError
from lossfloor.registry import Registry


def test_parameter_error_speaks_of_the_parameter_and_maps_to_an_option():
    err = ParameterError("kid_subsets", 0, "must be at least 1")
    assert isinstance(err, UserError)
    assert str(err) == "kid_subsets = 0: must be at least 1"
    assert err.for_option("--kid-subsets") == "--kid-subsets 0: must be at least 1"


def test_cli_reports_a_library_parameter_error_under_its_option(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "s.npz", samples=np.zeros((3, 1, 8, 8), np.float32))
    code = main(["fid", "--samples", str(tmp_path / "s.npz"), "--data", "digits", "--n", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "lossfloor: error: --n 1: a Fréchet distance needs at least 2 samples"


def test_registry_round_trip_aliases_and_errors():
    reg: Registry[object] = Registry("widget")

    @reg.register("knob", "dial")
    class Knob:
        name = "knob"

        def __init__(self, turns: int = 1) -> None:
            self.turns = turns

        def to_config(self) -> dict:
            return {"name": self.name, "turns": self.turns}

    k = reg.create(" DIAL ", turns=3)
    assert isinstance(k, Knob) and reg.from_config(k.to_config()).to_config() == k.to_config()
    assert reg.names == ("knob",) and reg.aliases == {"dial": "knob"}
    with pytest.raises(UserError, match="unknown widget 'lever'; use one of: knob, dial"):
        reg.create("lever")
    with pytest.raises(UserError, match="widget 'knob': .*twists"):
        reg.create("knob", twists=2)
    with pytest.raises(UserError, match="needs a 'name'"):
        reg.from_config({"turns": 2})
