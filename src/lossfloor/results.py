"""One base for lossfloor's result files (``Curve``, ``Diagnosis``, ``Floor``, ``ScalingFit``,
the optimal-loss schedule's table): a shared header, JSON derived from the dataclass fields,
atomic save, load with a one-line refusal of another kind of file, and CSV of the per-σ table.

A result file is indented JSON (``io.write_json``) that starts with the header

    {"format": FORMAT, "version": VERSION, "lossfloor_version": "<the writer's version>", ...}

followed by the result's fields in their order, and last, in files the CLI writes, a
``provenance`` block (``lossfloor.provenance.describe_run``: versions, command, CPU/GPU,
times). ``FORMAT`` names the kind ("lossfloor-curve"), ``VERSION`` the layout of its body (an
integer; a newer one than this lossfloor reads is refused), ``lossfloor_version`` the package
that wrote it (kept through load and save, as is the provenance, so a file round-trips byte
for byte). Files written before the shared header are still read: those
without a ``format`` (curves, diagnoses, scaling fits) when their body reads as the kind, and
those with the kind's ``LEGACY_FORMAT`` tag, whose ``version`` was the package's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Self

from lossfloor import __version__
from lossfloor.errors import UserError
from lossfloor.io import read_json, write_csv, write_json

#: The keys of the header, in the order the files have them.
HEADER = ("format", "version", "lossfloor_version")


def encode(value: Any) -> Any:
    """A field's value as JSON: objects with ``to_json()`` by it, tuples and lists item by
    item, anything else as it is."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    return value


def csv_header(columns: Mapping[str, str]) -> list[str]:
    """The CSV header of ``columns`` (name → unit): "name [unit]", or the name without one."""
    return [f"{k} [{unit}]" if unit else k for k, unit in columns.items()]


@dataclass(frozen=True, kw_only=True)
class Result:
    """A result with a file: subclasses are frozen dataclasses that set ``FORMAT`` (and
    ``VERSION`` when their body changes) and declare their JSON by class attributes:

    * ``OMIT``: field → the value at which the JSON leaves the field out (optional keys);
    * ``DECODE``: field → a function from its JSON value to the field's value (nested results);
    * ``CSV_COLUMNS``: the per-σ table's columns → their units (``to_csv``);

    and, where the file's layout is not the fields' one, by overriding ``json_fields`` (add
    derived keys, restructure) and ``from_fields`` (the inverse; it checks what it needs and
    raises a one-line ``UserError``). ``rows`` gives the per-σ table (default: the body's
    "points"). Every result draws itself with ``plot(ax)`` (``plot(axes)`` where it has
    several panels) through ``lossfloor.plots`` (a layer above this one) and returns the axes."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int] = 1
    #: The tag of this kind's files before the shared header (their "version": the package's).
    LEGACY_FORMAT: ClassVar[str | None] = None
    #: What the kind is, in words, for messages ("an optimal-loss curve").
    WHAT: ClassVar[str] = "a result"
    OMIT: ClassVar[Mapping[str, Any]] = {}
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = {}

    #: The lossfloor that wrote the result (None: a file written before it was recorded).
    lossfloor_version: str | None = __version__
    #: Where the result came from (``provenance.describe_run``: versions, command, CPU/GPU,
    #: times), added by the CLI; None (the library's results, older files): left out of the JSON.
    provenance: dict[str, Any] | None = None

    # --- JSON ------------------------------------------------------------------------------

    def json_fields(self) -> dict[str, Any]:
        """The body: each field (but the header's) in order, ``encode``d, except where it
        equals its ``OMIT`` value; ``provenance`` last, where there is one (a subclass's
        ``OMIT`` replaces the base's, so the base leaves it out itself)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in (*HEADER, "provenance") or (
                f.name in self.OMIT and value == self.OMIT[f.name]
            ):
                continue
            out[f.name] = encode(value)
        if self.provenance is not None:
            out["provenance"] = self.provenance
        return out

    def to_json(self) -> dict[str, Any]:
        """The file: the header, then ``json_fields()``."""
        header = {"format": self.FORMAT, "version": self.VERSION}
        if self.lossfloor_version is not None:
            header["lossfloor_version"] = self.lossfloor_version
        return {**header, **self.json_fields()}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """The result of a body (the JSON without its header): the fields present, through
        ``DECODE``; absent ones take their defaults; keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)} - set(HEADER)
        values = {k: cls.DECODE.get(k, _same)(v) for k, v in body.items() if k in names}
        try:
            return cls(**values)
        except TypeError as exc:
            raise UserError(f"not {cls.WHAT} ({exc})") from None

    @classmethod
    def from_json(cls, obj: Any, source: str = "") -> Self:
        """Read what ``to_json`` writes, or a file of this kind written before the shared
        header; another kind of file, or a newer version, is refused in one line naming what
        the file is (``source``: its path, for the message)."""
        where = f"{source}: " if source else ""
        if not isinstance(obj, dict):
            raise UserError(f"{where}not {cls.WHAT} ({cls.FORMAT}): the JSON is not an object")
        tag, version = obj.get("format"), obj.get("version")
        body = {k: v for k, v in obj.items() if k not in HEADER}
        if tag is not None and tag == cls.LEGACY_FORMAT:
            return cls._read(body, version if isinstance(version, str) else None, where)
        if tag is None:  # written before the shared header
            return cls._read(body, obj.get("lossfloor_version"), where)
        if tag != cls.FORMAT:
            raise UserError(f"{where}is a {tag} file, not {cls.WHAT} ({cls.FORMAT})")
        if not isinstance(version, int):
            raise UserError(f"{where}{tag} file without a valid version ({version!r})")
        if version > cls.VERSION:
            raise UserError(
                f"{where}is {tag} version {version}, newer than this lossfloor reads "
                f"({cls.VERSION}); upgrade lossfloor"
            )
        return cls._read(body, obj.get("lossfloor_version"), where)

    @classmethod
    def _read(cls, body: dict[str, Any], written_by: Any, where: str) -> Self:
        try:
            result = cls.from_fields(body)
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        return replace(
            result, lossfloor_version=written_by if isinstance(written_by, str) else None
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """``from_json`` of the file at ``path``."""
        return cls.from_json(read_json(path), source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_json()`` atomically (``io.write_json``: indented, floats as repr)."""
        write_json(path, self.to_json())

    # --- CSV -------------------------------------------------------------------------------

    def rows(self) -> Sequence[Mapping[str, Any]]:
        """The per-σ table, a mapping per row (default: the body's "points")."""
        points: Sequence[Mapping[str, Any]] = self.json_fields()["points"]
        return points

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """The per-σ table as CSV, atomically: one row per σ in the result's order, the
        ``CSV_COLUMNS`` with their units in the header ("sigma [VE sigma]"), a column a row
        lacks empty."""
        rows: Iterable[list[Any]] = ([r.get(k) for k in self.CSV_COLUMNS] for r in self.rows())
        write_csv(path, csv_header(self.CSV_COLUMNS), rows)


def _same(value: Any) -> Any:
    return value
