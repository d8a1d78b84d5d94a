"""The one device rule (``lossfloor.device.resolve_device``), shared by the API and the CLI."""

from __future__ import annotations

import inspect

import pytest
import torch

from lossfloor.cli.common import resolve_device as cli_rule
from lossfloor.device import resolve_device
from lossfloor.errors import ParameterError, UserError
from lossfloor.floor import floor, heldout_losses, with_heldout
from lossfloor.optimal import estimate_curve
from lossfloor.scaling.collection import collect


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert resolve_device("auto") == torch.device("cuda" if available else "cpu")
        assert cli_rule("auto") == resolve_device("auto")


def test_cuda_without_a_cuda_device_is_refused_in_one_line_by_the_api_and_the_cli(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParameterError, match="no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(UserError) as err:
        cli_rule("cuda")
    assert str(err.value) == "--device cuda: no CUDA device is available; use --device cpu"
    with pytest.raises(ParameterError, match="expected auto, cpu, cuda"):
        resolve_device("gpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_the_api_entry_points_on_data_default_to_auto():
    for fn in (estimate_curve, heldout_losses, floor, with_heldout, collect):
        assert inspect.signature(fn).parameters["device"].default == "auto", fn.__name__
