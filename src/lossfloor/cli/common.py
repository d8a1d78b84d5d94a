"""Options several subcommands share: data selection, σ grids, the device, output checks."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from lossfloor.errors import ParameterError, UserError
from lossfloor.io import check_writable

if TYPE_CHECKING:  # torch and the data layer load when a command runs, not for --help
    import torch

    from lossfloor.data import Dataset


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="digits | fashion-mnist[:test] | mnist10k | FILE.npz | FILE.npy | FOLDER | EDM.zip",
    )
    g.add_argument(
        "--limit", type=int, default=None, metavar="N", help="use the first N items (default: all)"
    )
    g.add_argument("--xflip", action="store_true", help="add mirrored copies (doubles the set)")
    g.add_argument("--key", default=None, help="array key inside an .npz (default: x, or the only)")
    g.add_argument("--labels-key", default=None, help="labels key inside an .npz (default: y)")


def load_data_from_args(args: argparse.Namespace) -> Dataset:
    """The Dataset named by --data/--limit/--xflip/--key/--labels-key."""
    from lossfloor.data import load_dataset

    return load_dataset(
        args.data, limit=args.limit, xflip=args.xflip, key=args.key, labels_key=args.labels_key
    )


def check_outputs(args: argparse.Namespace, *options: str) -> None:
    """Refuse, before any work, the output paths given to ``options`` that cannot be written."""
    for option in options:
        path = getattr(args, option.removeprefix("--").replace("-", "_"))
        if path is not None:
            check_writable(path, option)


def write_plot(path: str, draw: Callable[[], None], written: str | None) -> None:
    """``draw()`` the plot at ``path``; a failure is one line that says which result file
    (``written``) was saved before it."""
    try:
        draw()
    except Exception as exc:  # any plotting failure: the results are already safe
        kept = f"; the results are in {written}" if written else ""
        reason = f"{type(exc).__name__}: {exc}"
        raise UserError(f"--plot {path}: the plot failed ({reason}){kept}") from None


def parse_sigmas(text: str, option: str = "--sigmas") -> list[float]:
    """``"0.1,1,10"`` (a list) or ``"min:max:count"`` (log-spaced, both ends included), checked
    as a σ grid (``lossfloor.optimal.outer.check_sigmas``) and reported under ``option``."""
    from lossfloor.optimal.outer import check_sigmas

    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise UserError(f"{option} {text}: the count must be at least 1")
            if lo <= 0 or hi <= 0:
                raise UserError(f"{option} {text}: σ must be > 0 (the grid is log-spaced)")
            if count == 1:
                values = [lo]
            else:
                step = (math.log(hi) - math.log(lo)) / (count - 1)
                values = [math.exp(math.log(lo) + i * step) for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"{option} {text!r}: expected a comma-separated list (0.1,1,10) or min:max:count"
        ) from None
    try:
        check_sigmas(values)
    except ParameterError as exc:
        raise UserError(exc.for_option(option)) from None
    return values


#: The devices --device names; ``auto`` is cuda when a CUDA device is available, else cpu.
DEVICES = ("auto", "cpu", "cuda")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, the one device rule of every command (``resolve_device``)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda; auto: cuda when a CUDA device is available, else cpu",
    )


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype, the precision rule of the estimators (``outer.choose_dtype``)."""
    parser.add_argument(
        "--dtype",
        default="auto",
        help="float32 | float64 | auto (float64 where float32's error bound is too large: small "
        "σ, large data, huge σ)",
    )


def resolve_device(name: str) -> torch.device:
    """The torch device named by --device: cpu, cuda (which must be available) or auto (cuda
    when available, else cpu)."""
    import torch

    if name not in DEVICES:
        raise UserError(f"--device {name}: expected {' | '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)
