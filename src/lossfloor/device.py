"""The device rule of the library and the CLI: ``auto`` is cuda when a CUDA device is available,
else cpu; an explicit cuda device must exist."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lossfloor.errors import ParameterError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device ``device`` names: ``"auto"`` → cuda if ``torch.cuda.is_available()``
    else cpu; any other name or ``torch.device`` as given, refused when it is a cuda device and
    no CUDA device is available (``ParameterError("device", ...)``)."""
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(
            "device", device, "expected auto, cpu, cuda or a torch device"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", device, "no CUDA device is available; use {option} cpu")
    return resolved
