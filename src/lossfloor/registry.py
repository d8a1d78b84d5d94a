"""Name → class registries with a config round trip, for processes, targets, schedules and
estimators alike.

A registered class has ``name`` and ``to_config()`` → ``{"name": name, **parameters}``;
``registry.from_config(obj.to_config())`` rebuilds an equal object, so a run directory or a
result JSON that records a config reloads exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from lossfloor.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of one kind by canonical name (case-insensitive), with alternative spellings."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register under ``name`` (its ``to_config`` name) and ``aliases``."""

        def add(cls: type[T]) -> type[T]:
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return add

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical names."""
        return tuple(self._classes)

    @property
    def aliases(self) -> dict[str, str]:
        """Alternative spelling → canonical name."""
        return dict(self._aliases)

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` or an alias (case-insensitive); UserError if unknown."""
        by_key = {k.lower(): k for k in self._classes}
        by_key.update({k.lower(): v for k, v in self._aliases.items()})
        key = by_key.get(str(name).strip().lower())
        if key is None:
            valid = ", ".join([*self._classes, *self._aliases])
            raise UserError(f"unknown {self.kind} {name!r}; use one of: {valid}")
        return key

    def get(self, name: str) -> type[T]:
        """The class called ``name`` or an alias (UserError if unknown)."""
        return self._classes[self.canonical(name)]

    def create(self, name: str, **params: Any) -> T:
        """An instance of the class called ``name`` with ``params`` (the others at defaults)."""
        key = self.canonical(name)
        try:
            return self._classes[key](**params)
        except TypeError as exc:
            raise UserError(f"{self.kind} {key!r}: {exc}") from None

    def from_config(self, config: Mapping[str, Any] | str) -> T:
        """Rebuild from ``to_config()``'s dict (or a bare name: default parameters)."""
        if isinstance(config, str):
            return self.create(config)
        if not isinstance(config, Mapping) or "name" not in config:
            raise UserError(f"a {self.kind} config needs a 'name', got {config!r}")
        params = {k: v for k, v in config.items() if k != "name"}
        return self.create(config["name"], **params)
