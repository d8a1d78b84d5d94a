"""The one resumable checkpoint of long runs (``estimate_curve``'s σ, ``floor``'s subsets and
held-out σ): finished units of work, name → JSON value, saved atomically after each one under
the key of the data and options that produced them, so a rerun with the same ones computes only
what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossfloor.errors import ParameterError, UserError
from lossfloor.io import read_json, write_json


def checkpoint_key(key: Any) -> str:
    """sha256 of ``key`` (any JSON-able value, its dicts' keys sorted)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Checkpoint:
    """Finished units (name → JSON value) of ``what`` (e.g. "an estimate") at ``path``, under
    ``key`` (``checkpoint_key`` of the data and options). A file of another key, or one that
    is not a checkpoint, is refused unless ``restart`` (then the first new unit overwrites
    it). ``writes``: False on the processes other than rank 0 (they only read)."""

    path: Path
    key: str
    done: dict[str, Any]
    writes: bool = True

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], key: str, what: str, restart: bool = False
    ) -> Checkpoint:
        path = Path(path)
        done: dict[str, Any] = {}
        if path.is_file() and not restart:
            try:
                saved = read_json(path)
                ok = isinstance(saved, dict) and isinstance(saved.get("done"), dict)
            except UserError:
                ok = False
            if not ok:
                raise ParameterError(
                    "restart", None, f"{path} is not a checkpoint of {what}; delete it, or set "
                    "{option} to overwrite it",
                )  # fmt: skip
            if saved.get("key") != key:
                raise ParameterError(
                    "restart", None, f"{path} holds {len(saved['done'])} finished units of "
                    f"{what} with other data or options; rerun with those, or set {{option}} "
                    "to discard them",
                )  # fmt: skip
            done = saved["done"]
        return cls(path=path, key=key, done=done)

    def add(self, name: str, value: Any) -> None:
        """Record unit ``name`` and rewrite the file (if this process writes)."""
        self.done[name] = value
        if self.writes:
            write_json(self.path, {"key": self.key, "done": self.done})

    def drop(self, names: list[str]) -> None:
        """Forget units ``names`` and rewrite the file (if any of them was held)."""
        held = [name for name in names if name in self.done]
        for name in held:
            del self.done[name]
        if held and self.writes:
            write_json(self.path, {"key": self.key, "done": self.done})

    def remove(self) -> None:
        """Delete the file (the run is complete; if this process writes)."""
        if self.writes:
            self.path.unlink(missing_ok=True)

    def unit(self, name: str, compute: Callable[[], Any]) -> Any:
        """The saved value of unit ``name``, or ``compute()`` (then saved)."""
        if name in self.done:
            return self.done[name]
        value = compute()
        self.add(name, value)
        return value
