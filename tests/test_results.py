"""The result base (``lossfloor.results.Result``) and the results on it: the shared header,
JSON round trips, CSV tables, refusals of another kind of file or a newer version, and every
committed result file read and written back byte for byte."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_cli_hardening import one_line_error

from lossfloor import __version__
from lossfloor.cli import main
from lossfloor.diagnosis import REL_FLOOR, Diagnosis
from lossfloor.errors import UserError
from lossfloor.floor import Floor
from lossfloor.optimal import Curve
from lossfloor.results import HEADER, Result, csv_header
from lossfloor.scaling import ScalingFit
from lossfloor.schedules import OptimalLossSchedule
from lossfloor.schedules.optimal import ScheduleTable

ROOT = Path(__file__).resolve().parent.parent
#: The pre-header text of each committed result file (copied before the migration).
PRE_HEADER = Path(__file__).resolve().parent / "data" / "pre-header"

#: Every committed result file and its kind.
COMMITTED = {
    "tests/data/digits-demo.json": Curve,
    "tests/data/digits-cdol-vp.json": Curve,
    "docs/results/fmnist-full.json": Curve,
    "docs/results/scaling/optimal.json": Curve,
    "tests/data/digits-diagnosis.json": Diagnosis,
    "docs/results/fmnist-diagnosis.json": Diagnosis,
    "docs/results/fmnist-floor-reading.json": Diagnosis,
    "docs/results/fmnist-floor.json": Floor,
    "docs/results/scaling/fit-flops.json": ScalingFit,
    "docs/results/scaling/fit-params.json": ScalingFit,
}
#: Committed result files written with the header (no pre-header text): docs/latents.md's.
LATER: dict[str, type[Result]] = {
    f"docs/experiments/latents/study/{name}.json": kind
    for name, kind in [("jstar-mixture", Curve), ("jstar-means", Curve), ("jstar-sampled", Curve),
                       ("diagnose-mixture-seed0", Diagnosis), ("diagnose-means-seed0", Diagnosis)]
}  # fmt: skip
KINDS: list[type[Result]] = [Curve, Diagnosis, Floor, ScalingFit, ScheduleTable]


def leaves(obj: object, path: str = "") -> dict[str, object]:
    """Every value of a JSON document by its path, the top level's header keys left out."""
    if isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if path or k not in HEADER]
        return {p: x for k, v in items for p, x in leaves(v, f"{path}/{k}").items()}
    if isinstance(obj, list):
        return {p: x for i, v in enumerate(obj) for p, x in leaves(v, f"{path}/{i}").items()}
    return {path: obj}


@pytest.fixture(scope="module")
def schedule_table() -> ScheduleTable:
    curve = Curve.load(ROOT / "docs/results/fmnist-full.json")  # reaches σ_max = 80
    return OptimalLossSchedule.from_curve(curve, grid=64).tabulated()


@pytest.fixture(scope="module")
def examples(schedule_table: ScheduleTable) -> dict[type[Result], Result]:
    """One result of each kind."""
    loaded = {cls: cls.load(ROOT / path) for path, cls in reversed(COMMITTED.items())}
    return {**loaded, ScheduleTable: schedule_table}


# --- committed files ---------------------------------------------------------------------


@pytest.mark.parametrize("path", COMMITTED | LATER, ids=lambda p: Path(p).name)
def test_every_committed_result_file_round_trips_byte_for_byte(path, tmp_path):
    (COMMITTED | LATER)[path].load(ROOT / path).save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (ROOT / path).read_bytes()


def test_every_committed_file_with_a_result_header_is_listed():
    tags = {cls.FORMAT for cls in KINDS}
    found = []
    for folder in ("docs", "experiments", "tests/data"):
        for path in sorted((ROOT / folder).rglob("*.json")):
            obj = json.loads(path.read_text())
            if isinstance(obj, dict) and obj.get("format") in tags:
                found.append(path.relative_to(ROOT).as_posix())
    assert sorted(found) == sorted(COMMITTED | LATER)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: Path(p).name)
def test_a_file_with_its_old_header_reads_as_the_migrated_file(path):
    """The text before the shared header (no format tag; a floor's "lossfloor-floor/1" with the
    package version in "version") reads with every value of the migrated file, and the same
    writer's version. The one change: a diagnosis written before REL_FLOOR had gap/J* where
    J* < REL_FLOOR × the largest J* (1e33 at J* = 7e-37); the file now has null there."""
    cls = COMMITTED[path]
    old_text = (PRE_HEADER / path.replace("/", "--")).read_text()
    old, new = json.loads(old_text), json.loads((ROOT / path).read_text())
    assert "format" not in old or old["format"] == "lossfloor-floor/1"
    again = cls.from_json(old).to_json()
    assert again == new
    assert again.get("lossfloor_version") == old.get("lossfloor_version", old.get("version"))
    before, after = leaves(old), leaves(new)
    assert before.keys() == after.keys()
    changed = sorted(
        k for k in before if before[k] != after[k] or type(before[k]) is not type(after[k])
    )
    if cls is Diagnosis:
        top = max(p["optimal_loss"] for p in old["points"])
        blanked = [
            f"/points/{i}/relative_gap"
            for i, p in enumerate(old["points"])
            if p["optimal_loss"] < REL_FLOOR * top and p["relative_gap"] is not None
        ]
        assert changed == blanked and all(after[k] is None for k in blanked)
    else:
        assert changed == []


# --- the header and refusals -------------------------------------------------------------


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_a_result_writes_the_shared_header_first_and_reads_itself_back(cls, examples):
    result = examples[cls]
    obj = result.to_json()
    assert list(obj)[:2] == ["format", "version"]
    assert (obj["format"], obj["version"]) == (cls.FORMAT, cls.VERSION)
    text = json.dumps(obj)
    again = cls.from_json(json.loads(text))
    assert again.to_json() == obj


def test_a_new_result_records_the_lossfloor_that_wrote_it(schedule_table):
    assert schedule_table.to_json()["lossfloor_version"] == __version__
    assert list(schedule_table.to_json())[:3] == list(HEADER)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_another_kind_of_result_is_refused_in_one_line_naming_it(cls, examples, tmp_path):
    for other in KINDS:
        if other is cls:
            continue
        path = tmp_path / f"{other.__name__}.json"
        examples[other].save(path)
        with pytest.raises(UserError) as err:
            cls.load(path)
        message = str(err.value)
        assert "\n" not in message and other.FORMAT in message and str(path) in message
        assert cls.FORMAT in message


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_a_newer_version_is_refused_and_the_same_version_read(cls, examples):
    obj = examples[cls].to_json()
    with pytest.raises(UserError, match=f"version {cls.VERSION + 1}, newer"):
        cls.from_json({**obj, "version": cls.VERSION + 1})
    with pytest.raises(UserError, match="without a valid version"):
        cls.from_json({**obj, "version": "2"})
    assert cls.from_json(obj).to_json() == obj


def test_a_json_that_is_not_an_object_is_refused():
    with pytest.raises(UserError, match="not an optimal-loss curve"):
        Curve.from_json([1, 2])


def test_the_cli_refuses_a_diagnosis_given_as_a_curve_in_one_line(tmp_path, capsys):
    out = tmp_path / "s.json"
    argv = ["--curve", str(ROOT / "docs/results/fmnist-diagnosis.json"), "--out", str(out)]
    line = one_line_error(capsys, ["schedule", *argv])
    assert "lossfloor-diagnosis" in line and "lossfloor-curve" in line
    assert not out.exists()


# --- CSV -----------------------------------------------------------------------------------


def _csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _cell(value: object) -> str:
    """What ``io.write_csv`` writes for ``value``."""
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_the_csv_is_the_per_sigma_table_with_units_in_the_header(cls, examples, tmp_path):
    result = examples[cls]
    result.to_csv(tmp_path / "t.csv")
    header, *rows = _csv(tmp_path / "t.csv")
    assert header == csv_header(cls.CSV_COLUMNS)
    assert header[0].startswith("sigma [VE sigma")
    table = result.rows()
    assert len(rows) == len(table) > 0
    for row, want in zip(rows, table, strict=True):
        assert row == [_cell(want.get(k)) for k in cls.CSV_COLUMNS]
        assert sum(cell != "" for cell in row) >= 3  # the columns name keys the table has


def test_the_curve_csv_has_one_row_per_point_in_the_file_order(examples, tmp_path):
    curve = examples[Curve]
    curve.to_csv(tmp_path / "c.csv")
    _, *rows = _csv(tmp_path / "c.csv")
    assert [float(r[0]) for r in rows] == [p.sigma for p in curve.points]
    assert [float(r[2]) for r in rows] == [p.optimal_loss for p in curve.points]


def test_the_diagnosis_csv_leaves_gap_over_j_star_empty_where_j_star_is_about_0(tmp_path):
    result = Diagnosis.load(ROOT / "docs/results/fmnist-floor-reading.json")
    result.to_csv(tmp_path / "d.csv")
    header, *rows = _csv(tmp_path / "d.csv")
    rel = header.index("relative_gap [gap / optimal_loss]")
    top = result.optimal_top
    for row, p in zip(rows, result.points, strict=True):
        assert (row[rel] == "") == (p.optimal_loss < REL_FLOOR * top)


def test_the_floor_csv_flags_crossings_and_holds_the_heldout_losses(examples, tmp_path):
    result = examples[Floor]
    result.to_csv(tmp_path / "f.csv")
    header, *rows = _csv(tmp_path / "f.csv")
    for row, p in zip(rows, result.points, strict=True):
        cells = dict(zip(header, row, strict=True))
        assert cells["crossing"] == (p.crossing or "")
        assert float(cells["heldout_loss [x0 units per element]"]) == p.heldout.heldout_loss
        assert float(cells["lower [x0 units per element]"]) == p.lower


def test_the_scaling_csv_has_a_row_per_fit_the_total_with_an_empty_sigma(examples, tmp_path):
    result = examples[ScalingFit]
    result.to_csv(tmp_path / "s.csv")
    header, *rows = _csv(tmp_path / "s.csv")
    for row, fit in zip(rows, result.fits, strict=True):
        cells = dict(zip(header, row, strict=True))
        assert cells[header[0]] == ("" if fit.sigma is None else repr(fit.sigma))
        assert float(cells["subtracted_alpha [dimensionless]"]) == fit.subtracted.alpha
        assert int(cells["subtracted_dropped_rows [rows]"]) == len(fit.subtracted.dropped)


def test_the_schedule_csv_is_its_grid(schedule_table, tmp_path):
    schedule_table.to_csv(tmp_path / "s.csv")
    _, *rows = _csv(tmp_path / "s.csv")
    assert [float(r[0]) for r in rows] == schedule_table.sigma
    assert [float(r[2]) for r in rows] == schedule_table.weight
    assert all(r[4] == "" for r in rows)  # no gap source: the gap column is empty


def test_a_scaling_fit_read_from_its_file_has_no_rows_to_plot(examples):
    with pytest.raises(UserError, match="no rows to plot"):
        examples[ScalingFit].plot()


# --- the CLI writes the results through the base ------------------------------------------


def test_the_schedule_cli_writes_the_table_and_its_csv(tmp_path, capsys):
    out, table = tmp_path / "s.json", tmp_path / "s.csv"
    curve = ROOT / "docs/results/fmnist-full.json"
    argv = ["schedule", "--curve", str(curve), "--out", str(out), "--csv", str(table)]
    assert main(argv) == 0, capsys.readouterr().err
    result = ScheduleTable.load(out)
    assert result.to_json()["lossfloor_version"] == __version__
    result.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == out.read_bytes()
    result.to_csv(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == table.read_bytes()
    assert len(_csv(table)) == 1 + len(result.sigma)


def test_the_scaling_fit_cli_writes_one_csv_row_per_fit(tmp_path, capsys):
    from test_scaling import _curve, _synthetic_rows

    from lossfloor.scaling import write_runs

    runs, est, out, table = (tmp_path / n for n in ("r.csv", "e.json", "f.json", "f.csv"))
    write_runs(runs, _synthetic_rows())
    _curve().save(est)
    argv = ["scaling", "fit", "--runs", str(runs), "--optimal", str(est), "--out", str(out)]
    assert main([*argv, "--csv", str(table)]) == 0, capsys.readouterr().err
    result = ScalingFit.load(out)
    _, *rows = _csv(table)
    assert [r[0] for r in rows] == ["" if f.sigma is None else repr(f.sigma) for f in result.fits]
    result.to_csv(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == table.read_bytes()
