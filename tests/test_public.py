"""The public face: ``import lossfloor`` is light, and its lazy names are the library's own."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import lossfloor
from lossfloor.data import load_dataset
from lossfloor.optimal import estimate_curve, make_estimator


def test_import_lossfloor_and_listing_its_names_import_neither_torch_nor_numpy():
    probe = (
        "import json, sys, lossfloor\n"
        "names = dir(lossfloor), lossfloor.__all__, lossfloor.__version__\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    modules = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert "lossfloor" in modules and not modules & {"torch", "numpy"}


@pytest.mark.parametrize("name", lossfloor.__all__)
def test_every_public_name_resolves_to_the_object_of_its_module(name):
    value = getattr(lossfloor, name)
    if name != "__version__":
        module, attribute = lossfloor._EXPORTS[name]
        assert value is getattr(importlib.import_module(module), attribute)
    assert name in dir(lossfloor)


def test_all_lists_exactly_the_lazy_exports():
    assert lossfloor.__all__ == ["__version__", *sorted(lossfloor._EXPORTS)]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = lossfloor.nonexistent


def _numbers(curve: lossfloor.Curve) -> dict:
    """The curve's JSON less each point's wall-clock seconds."""
    out = curve.to_json()
    out["points"] = [{k: v for k, v in p.items() if k != "seconds"} for p in out["points"]]
    return out


def test_estimate_curve_of_a_dataset_spec_and_a_name_equals_the_explicit_form_bitwise():
    short = lossfloor.estimate_curve("digits", [1.0], "full", outer=64, seed=0, progress=False)
    ds = load_dataset("digits")
    explicit = estimate_curve(
        ds, [1.0], make_estimator("full", ds.n), outer=64, seed=0, progress=False
    )
    assert _numbers(short) == _numbers(explicit)  # == on floats: bitwise


def test_estimate_curve_takes_an_estimator_config_with_defaults_for_this_n():
    ds = load_dataset("digits")
    kw = dict(outer=64, seed=0, progress=False)
    by_config = estimate_curve(ds, [1.0], {"name": "cdol", "inner": 100}, **kw)
    explicit = estimate_curve(ds, [1.0], make_estimator("cdol", ds.n, inner=100), **kw)
    assert by_config.estimator["C"] == 4.0 * ds.n / 100  # C defaults to 4N/L for this N
    assert _numbers(by_config) == _numbers(explicit)
