"""``python:MODULE:CALLABLE``: a user's callable named on the command line (a denoiser's factory
for ``--model``, an encoder for ``encode --vae``), imported in one place."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lossfloor.errors import UserError

PYTHON_PREFIX = "python:"


@contextmanager
def cwd_importable() -> Iterator[str]:
    """The current directory on sys.path while the block runs (a user's callable may import
    its neighbours when called); yields it."""
    cwd, added = os.getcwd(), os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added:
            sys.path.remove(cwd)


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """CALLABLE of ``python:MODULE:CALLABLE`` (MODULE imported from sys.path and the current
    directory, ``cwd_importable``; CALLABLE may be dotted, ``mod:Class.make``); each failure is
    one line naming ``what`` ("model") and the spec."""
    module_name, _, attr = spec.removeprefix(PYTHON_PREFIX).partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} {spec!r}: expected python:MODULE:CALLABLE (e.g. python:mine:make)")
    with cwd_importable() as cwd:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UserError(f"{what} {spec}: no module named {exc.name!r} (looked on sys.path "
                            f"and in {cwd})") from None  # fmt: skip
        except Exception as exc:  # the user's module failed: say how, in one line
            raise UserError(f"{what} {spec}: importing {module_name} failed "
                            f"({type(exc).__name__}: {exc})") from None  # fmt: skip
        try:
            found = functools.reduce(getattr, attr.split("."), module)
        except AttributeError:
            raise UserError(f"{what} {spec}: {module_name} has no attribute {attr!r}") from None
    if not callable(found):
        raise UserError(f"{what} {spec}: {attr} is not callable")
    return found
