"""The report's inputs: each path read as the result it is (by its header ``format``), a
training-stats file or a run directory, and the inputs grouped by the data they are of (the
dataset fingerprint, sha256)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossfloor.errors import UserError
from lossfloor.io import read_json
from lossfloor.results import Result
from lossfloor.runfiles import CONFIG, STATS

#: The kinds of input, in the order their sections appear within a dataset.
KINDS = ("estimate", "diagnosis", "floor", "schedule", "scaling-fit", "training")


@dataclass
class Input:
    """One input: its path, kind (``KINDS``), the result read (a ``Result``, or for training
    the stats records) and, for a run directory, its config."""

    path: str
    kind: str
    result: Any
    config: dict[str, Any] | None = None

    @property
    def dataset(self) -> dict[str, Any] | None:
        """The description of the data the input is of (None where it records none)."""
        if self.kind == "training":
            data = (self.config or {}).get("data")
            return data if isinstance(data, dict) else None
        if self.kind == "schedule":  # the curve's data, among the schedule's parameters
            data = self.result.params.get("dataset")
        else:
            data = getattr(self.result, "dataset", None)
        return data if isinstance(data, dict) else None

    @property
    def fingerprint(self) -> str | None:
        """The data's sha256 (None where the input records none)."""
        sha = (self.dataset or {}).get("sha256")
        return sha if isinstance(sha, str) else None


@dataclass
class DataGroup:
    """The inputs of one dataset (``fingerprint`` None: those that record no data)."""

    fingerprint: str | None
    dataset: dict[str, Any] | None
    inputs: list[Input] = field(default_factory=list)

    def of(self, kind: str) -> list[Input]:
        """The inputs of ``kind``, in the order given."""
        return [i for i in self.inputs if i.kind == kind]


def _classes() -> dict[str, tuple[str, type[Result]]]:
    """header ``format`` → (kind, result class)."""
    from lossfloor.diagnosis import Diagnosis
    from lossfloor.floor import Floor
    from lossfloor.optimal import Curve
    from lossfloor.scaling import ScalingFit
    from lossfloor.schedules.optimal import ScheduleTable

    table: dict[str, tuple[str, type[Result]]] = {
        Curve.FORMAT: ("estimate", Curve),
        Diagnosis.FORMAT: ("diagnosis", Diagnosis),
        Floor.FORMAT: ("floor", Floor),
        ScheduleTable.FORMAT: ("schedule", ScheduleTable),
        ScalingFit.FORMAT: ("scaling-fit", ScalingFit),
    }
    if Floor.LEGACY_FORMAT:
        table[Floor.LEGACY_FORMAT] = ("floor", Floor)
    return table


def _headerless(obj: dict[str, Any]) -> str:
    """The result format of a file written before the shared header, by its keys."""
    if "fits" in obj:
        return "lossfloor-scaling-fit"
    points = obj.get("points")
    if isinstance(points, list) and points and isinstance(points[0], dict):
        return "lossfloor-diagnosis" if "gap" in points[0] else "lossfloor-curve"
    raise UserError("not a lossfloor result (no format header, no points)")


def _read_json_result(path: str) -> Input:
    try:
        obj = read_json(path)  # missing or not JSON: one line
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a lossfloor result (not text)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a lossfloor result (the JSON is not an object)")
    classes = _classes()
    tag = obj.get("format")
    try:
        tag = _headerless(obj) if tag is None else tag
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if tag not in classes:
        known = ", ".join(sorted({k for k in classes if "/" not in k}))
        raise UserError(f"{path}: a {tag!r} file is no result the report reads ({known})")
    kind, cls = classes[tag]
    return Input(path, kind, cls.from_json(obj, source=path))


def _read_stats(path: Path, config: dict[str, Any] | None, name: str) -> Input:
    from lossfloor.training.stats import read_stats

    records = read_stats(path)
    if not records:
        raise UserError(f"{path}: no training-stats records (stats.jsonl lines)")
    return Input(name, "training", records, config)


def read_input(path: str) -> Input:
    """The input at ``path``: a result JSON (by its ``format``), a stats.jsonl file, or a run
    directory (its stats.jsonl and config.json). Anything else: one-line ``UserError``."""
    p = Path(path)
    if p.is_dir():
        stats, config = p / STATS, p / CONFIG
        if not stats.is_file():
            raise UserError(f"{path}: a folder without {STATS} is no run directory")
        cfg = read_json(config) if config.is_file() else None
        return _read_stats(stats, cfg if isinstance(cfg, dict) else None, path)
    if not p.is_file():
        raise UserError(f"{path}: no such file or run directory")
    if p.suffix == ".jsonl":
        return _read_stats(p, None, path)
    return _read_json_result(path)


def group_by_data(inputs: Sequence[Input]) -> list[DataGroup]:
    """The inputs grouped by data fingerprint, groups in the order first met, the group of
    inputs without one (scaling fits, stats files alone) last; within a group, by ``KINDS``."""
    groups: dict[str | None, DataGroup] = {}
    for item in inputs:
        key = item.fingerprint
        if key not in groups:
            groups[key] = DataGroup(key, item.dataset)
        groups[key].inputs.append(item)
    ordered = [g for k, g in groups.items() if k is not None]
    ordered += [g for k, g in groups.items() if k is None]
    for g in ordered:
        g.inputs.sort(key=lambda i: KINDS.index(i.kind))
    return ordered


def describe_data(dataset: dict[str, Any] | None) -> str:
    """The data in words: name, N, the shape of an item and the short fingerprint."""
    if not dataset:
        return "data not recorded"
    shape = dataset.get("shape")
    parts = [str(dataset.get("name", "unnamed data"))]
    if dataset.get("n") is not None:
        parts.append(f"N = {dataset['n']:,}")
    if shape:
        parts.append("×".join(str(s) for s in shape))
    if dataset.get("sha256"):
        parts.append(f"sha256 {str(dataset['sha256'])[:12]}…")
    return ", ".join(parts)


def json_text(value: Any) -> str:
    """A small JSON value as compact text (options in the provenance)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
