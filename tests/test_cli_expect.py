"""Issue 14, the rest: error wording, plots that mark floored values, J* at huge σ in float64,
reusing an estimate in diagnose, CSV tables, help texts and progress lines (through the CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import pytest
from test_cli_hardening import EST, one_line_error

from lossfloor.cli import main
from lossfloor.plots import BELOW_FLOOR


def test_random_bytes_are_not_a_valid_npz_or_npy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("r.npz", "r.npy"):
        (tmp_path / name).write_bytes(rng.bytes(2000))
        line = one_line_error(capsys, ["data", "--data", str(tmp_path / name)])
        assert f"is not a valid .{name[-3:]} file" in line and "pickle" not in line


def test_a_scalar_npy_is_called_a_scalar(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.float32(3.0))
    line = one_line_error(capsys, ["data", "--data", str(tmp_path / "s.npy")])
    assert "scalar (0-d)" in line and "empty" not in line


def test_gray_and_rgb_images_of_one_size_differ_in_channels(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.png")
    line = one_line_error(capsys, ["data", "--data", str(tmp_path)])
    assert "differ in channels" in line and "gray (1 channel)" in line and "size" not in line


def _drawn_lines(monkeypatch) -> list[list[tuple[str, np.ndarray, np.ndarray]]]:
    """Record (label, x, y) of every line of each figure the plots save."""
    import lossfloor.plots
    from lossfloor.plots import curves, diagnosis, floor, scaling, schedule

    figures, real = [], lossfloor.plots.save_figure

    def keep(fig, path):
        figures.append(
            [
                (ln.get_label(), ln.get_xdata(), ln.get_ydata())
                for ax in fig.axes
                for ln in ax.get_lines()
            ]  # fmt: skip
        )
        real(fig, path)

    for module in (curves, diagnosis, floor, scaling, schedule):  # each saves its own PNGs
        monkeypatch.setattr(module, "save_figure", keep)
    return figures


def test_estimate_plot_marks_a_zero_optimal_loss(tmp_path, capsys, monkeypatch):
    figures = _drawn_lines(monkeypatch)
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    argv = [*EST, "--sigmas", "1e-4,1,10", "--out", str(out), "--plot", str(png)]
    argv += ["--draws", "plain"]  # tilted draws' index bounds J*: ▼ at the bound instead
    assert main(argv) == 0 and png.stat().st_size > 0
    values = [p["optimal_loss"] for p in json.loads(out.read_text())["points"]]
    assert values[0] == 0 and min(values[1:]) > 0
    (marked,) = [(x, y) for label, x, y in figures[0] if label == BELOW_FLOOR]
    assert list(marked[0]) == [1e-4]  # only the zero is marked, at the axis' floor
    curve = next(y for label, _, y in figures[0] if label == "full")
    assert marked[1][0] == curve[0] < min(values[1:]) / 2


def test_diagnosis_plot_with_no_positive_loss(tmp_path, capsys, monkeypatch):
    """The optimal denoiser at σ = 1e-4 has J_θ = J* = 0 at every draw: the plot is drawn (it
    crashed on min() of nothing) and both points are marked as below the floor."""
    figures = _drawn_lines(monkeypatch)
    png = tmp_path / "d.png"
    argv = ["diagnose", "--model", "optimal", "--data", "digits", "--limit", "50", "--sigmas",
            "1e-4", "--outer", "8", "--no-cache", "--quiet", "--out", str(tmp_path / "d.json"),
            "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert png.stat().st_size > 0
    marked = [x for label, x, _ in figures[0] if label == BELOW_FLOOR]
    assert len(marked) == 1 and list(marked[0]) == [1e-4]
    assert sum(label.startswith("_") for label, _, _ in figures[0]) >= 1  # the second ▽: no label


def test_diagnose_at_huge_sigma_gives_the_data_variance(tmp_path, capsys):
    """σ up to float32's range: J* (auto precision: float64 once R² + D·σ² passes 1e30) and the
    optimal model's loss are the data variance (M = N: every point drawn once). Beyond it the
    model's float32 input overflows: one line."""
    from lossfloor.data import load_dataset, mean_and_variance

    variance = mean_and_variance(load_dataset("digits", limit=50).x)[1]
    out = tmp_path / "d.json"
    base = ["diagnose", "--model", "optimal", "--data", "digits", "--limit", "50", "--outer",
            "50", "--no-cache", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([*base, "--sigmas", "1e20,1e37"]) == 0, capsys.readouterr().err
    for p in json.loads(out.read_text())["points"]:
        assert p["optimal_loss"] == pytest.approx(variance, rel=1e-9)
        assert p["model_loss"] == pytest.approx(variance, rel=1e-6)  # the model's float32 output
    line = one_line_error(capsys, [*base, "--sigmas", "1,1e38"])
    assert "--sigmas 1e+38" in line and "overflows the data's float32" in line


DIAG = ["diagnose", "--model", "optimal", "--data", "digits", "--limit", "60", "--no-cache"]


@pytest.mark.slow
@pytest.mark.numerics
def test_diagnose_reuses_an_estimate_of_the_same_draws(tmp_path, capsys):
    """--curve: J* is the estimate's direct form, the same per-sample mean diagnose computes,
    so every number equals a paired run's except the gap's ±, the bound se(J_θ) + se(J*)."""
    est = tmp_path / "c.json"
    assert main([*EST[:4], "60", "--quiet", "--sigmas", "0.3,1,3", "--outer", "90",
                 "--seed", "2", "--draws", "plain", "--out", str(est)]) == 0  # fmt: skip
    paired, reused = tmp_path / "p.json", tmp_path / "r.json"
    assert main([*DIAG, "--sigmas", "0.3,1,3", "--outer", "90", "--seed", "2", "--quiet",
                 "--out", str(paired)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*DIAG, "--curve", str(est), "--out", str(reused)]) == 0  # grid, M, seed: its own
    table = capsys.readouterr().out
    assert "a bound on the gap's standard error" in table and str(est) in table
    p, r = (json.loads(f.read_text()) for f in (paired, reused))
    assert (r["outer"], r["seed"], r["paired"], r["optimal_from"]) == (90, 2, False, str(est))
    assert "paired" not in p and "optimal_from" not in p  # paired: the files as before
    from lossfloor.diagnosis import Diagnosis

    assert Diagnosis.load(reused).to_json() == r  # paired: False survives reading back
    for a, b in zip(p["points"], r["points"], strict=True):
        for key in ("sigma", "model_loss", "optimal_loss", "optimal_loss_stderr"):
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-300), key
        assert b["gap"] == pytest.approx(a["gap"], rel=1e-9, abs=1e-15)
        assert b["gap_stderr"] == pytest.approx(b["model_loss_stderr"] + b["optimal_loss_stderr"])
        assert b["gap_stderr"] >= a["gap_stderr"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seed", "3"], "not M = 90, seed 3"),
        (["--outer", "50"], "not M = 50, seed 2"),
        (["--sigmas", "0.5"], "no J* at σ = 0.5"),
        (["--limit", "59"], "of other data"),
    ],
)
def test_diagnose_refuses_an_estimate_it_cannot_pair(tmp_path, capsys, args, words):
    est = tmp_path / "c.json"
    assert main([*EST[:4], "60", "--quiet", "--sigmas", "0.3,1", "--outer", "90", "--seed", "2",
                 "--draws", "plain", "--out", str(est)]) == 0  # fmt: skip
    capsys.readouterr()  # the estimate's warning about unresolved σ
    out = tmp_path / "d.json"
    line = one_line_error(capsys, [*DIAG, "--curve", str(est), *args, "--out", str(out)])
    assert line.startswith("lossfloor: error: --curve: ") and words in line
    assert not out.exists()


def test_diagnose_takes_an_estimate_on_its_default_tilted_draws(tmp_path, capsys):
    """The full estimate's default tilted draws: diagnose takes the model's loss on them
    (issue 27 item 3; the references are in test_workflows.py)."""
    est, out = tmp_path / "c.json", tmp_path / "d.json"
    assert main([*EST[:4], "60", "--quiet", "--sigmas", "1", "--out", str(est)]) == 0
    assert main([*DIAG, "--curve", str(est), "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["draws"] == "tilted"


def test_diagnose_refuses_a_subsampled_estimate(tmp_path, capsys):
    est = tmp_path / "c.json"
    assert main([*EST[:4], "60", "--quiet", "--sigmas", "1", "--estimator", "cdol",
                 "--out", str(est)]) == 0  # fmt: skip
    capsys.readouterr()
    line = one_line_error(capsys, [*DIAG, "--curve", str(est), "--out", str(tmp_path / "d")])
    assert "cdol estimate" in line and "exact posterior" in line


def _csv(path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_estimate_csv_is_the_json_table_with_units(tmp_path, capsys):
    from lossfloor.optimal.curve import CSV_COLUMNS, CurvePoint

    out, table = tmp_path / "e.json", tmp_path / "e.csv"
    assert main([*EST, "--sigmas", "0.2,2", "--out", str(out), "--csv", str(table)]) == 0
    rows, points = _csv(table), json.loads(out.read_text())["points"]
    assert list(CSV_COLUMNS) == [f.name for f in dataclasses.fields(CurvePoint)]
    assert list(rows[0])[:3] == ["sigma [VE sigma]", "t [process time]",
                                 "optimal_loss [x0 units per element]"]  # fmt: skip
    for row, point in zip(rows, points, strict=True):
        for head, value in row.items():
            want = point.get(head.split(" [")[0])  # fields that are None may be left out
            if want is None or isinstance(want, (str, bool)):
                assert value == ("" if want is None else str(want)), head
            else:
                assert float(value) == want, head


def test_diagnose_csv_and_csv_checked_before_work(tmp_path, capsys):
    out, table = tmp_path / "d.json", tmp_path / "d.csv"
    argv = [*DIAG, "--sigmas", "0.5,2", "--outer", "16", "--quiet", "--out", str(out)]
    assert main([*argv, "--csv", str(table)]) == 0
    from lossfloor.diagnosis import CSV_COLUMNS

    rows, points = _csv(table), json.loads(out.read_text())["points"]
    for row, point in zip(rows, points, strict=True):
        assert set(point) <= set(CSV_COLUMNS)  # every number of the JSON has its column
        assert float(row["gap [x0 units per element]"]) == point["gap"]
        assert float(row["relative_gap [gap / optimal_loss]"]) == point["relative_gap"]
        assert row["loss_factor [target units / x0 units]"] == ""  # the optimal model has none
    out.unlink()
    line = one_line_error(capsys, [*argv, "--csv", str(tmp_path)])
    assert "--csv" in line and "folder" in line and not out.exists()
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--csv", str(tmp_path)])
    assert "--csv" in line


def test_tables_say_what_their_columns_are(tmp_path, capsys):
    assert main([*EST[:-1], "--sigmas", "1e-4,1"]) == 0
    out = capsys.readouterr()
    assert "s: seconds for that σ" in out.out and "x0 units" in out.out
    assert "J*(σ) in blocks of the 100 draws (1 per σ)" in out.err  # what the bar counts
    assert main([*DIAG, "--sigmas", "1e-4,1", "--outer", "16", "--out", str(tmp_path / "d")]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines[1].split()
    assert first[0] == "0.0001" and first[-1] == "—"  # J* = 0: no ratio
    assert "rel: gap / J*" in lines[3] and "paired standard error" in lines[3]


def _parsers() -> list[argparse.ArgumentParser]:
    """Every command's parser (scaling's actions included)."""
    from lossfloor.cli import build_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    return list(walk(build_parser()))


def test_every_option_has_help_that_states_its_default():
    parsers = _parsers()
    names = {p.prog.removeprefix("lossfloor").strip() for p in parsers}
    assert {"", "data", "estimate", "diagnose", "train", "sample", "fid", "scaling fit",
            "scaling collect"} <= names  # fmt: skip
    for parser in parsers:
        helper = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.option_strings[0] == "-h":
                continue
            name = f"{parser.prog} {action.option_strings[0]}"
            assert action.help, name  # --seed of estimate and diagnose had none
            shown = helper._get_help_string(action)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, name


def test_help_states_units_and_the_fid_description_is_whole(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in MiB (default: 32.0)" in text and "σ grid (VE σ, x0 units)" in text
    with pytest.raises(SystemExit):
        main(["fid", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "reference counts." in text and "KID is the unbiased MMD²" in text


def test_one_device_rule_for_every_command(capsys):
    import torch

    from lossfloor.cli.common import resolve_device

    with_device = [p for p in _parsers() if "--device" in p._option_string_actions]
    names = {p.prog.removeprefix("lossfloor ") for p in with_device}
    assert {"estimate", "diagnose", "train", "sample", "fid", "scaling collect"} <= names
    for parser in with_device:
        action = parser._option_string_actions["--device"]
        assert action.default == "auto" and "auto: cuda when" in action.help, parser.prog
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--device", "gpu"])
    assert "--device gpu: expected auto | cpu | cuda" in line


@pytest.mark.slow
def test_train_prints_a_line_per_log_interval_when_stderr_is_not_a_terminal(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--limit", "16", "--steps", "4", "--batch", "8",
            "--model", "tiny", "--log-every", "2", "--checkpoint-every", "100"]  # fmt: skip
    assert main([*argv, "--run-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert not sys.stderr.isatty()  # captured
    lines = [ln for ln in err.splitlines() if ln.startswith("train: step")]
    assert [ln.split(",")[0] for ln in lines] == ["train: step 2/4", "train: step 4/4"]
    assert "16 images" in lines[0] and "32 images" in lines[1] and "loss" in lines[1]
    assert main([*argv, "--run-dir", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "train: step" not in capsys.readouterr().err


@pytest.mark.slow
def test_the_readme_python_example_writes_what_the_cli_writes(tmp_path, capsys, monkeypatch):
    """The README's Python API block, run as it is, saves the same JSON and CSV as the command
    its comment names (on the CPU: same numbers to the last bit; only the seconds differ, and
    the CLI's file adds its provenance)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    argv = ["estimate", "--data", "digits", "--sigmas", "0.1,0.3,1,3,10", "--outer", "3594",
            "--total", "edm", "--device", "cpu", "--quiet", "--out", "cli.json", "--csv",
            "cli.csv"]  # fmt: skip
    assert "--sigmas 0.1,0.3,1,3,10 --outer 3594 --total edm" in block
    assert main(argv) == 0
    api, cli = (json.loads(Path(f).read_text()) for f in ("digits.json", "cli.json"))
    assert "provenance" not in api and cli.pop("provenance")["command"].startswith("lossfloor ")
    for rec in (api, cli):
        for p in rec["points"]:
            p.pop("seconds")
    assert api == cli
    rows = [_csv(f) for f in ("digits.csv", "cli.csv")]
    for row in (r for rs in rows for r in rs):
        row.pop("seconds [s]")
    assert rows[0] == rows[1] and len(rows[0]) == 5
