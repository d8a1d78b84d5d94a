"""Hostile input through the CLI (issue 14): one line on stderr and exit 2 before any work, or
a correct value; never a traceback or a NaN."""

from __future__ import annotations

import json

import pytest

from lossfloor.cli import main

EST = ["estimate", "--data", "digits", "--limit", "100", "--quiet"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert exit 2 and a single stderr line; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lossfloor: error: "), err
    return lines[0]


def _commands(out: str) -> list[list[str]]:
    """Each command with one output path set to ``out`` (and inputs that would fail later)."""
    return [
        [*EST, "--sigmas", "1", "--out", out],
        [*EST, "--sigmas", "1", "--plot", out],
        ["diagnose", "--model", "missing-run", "--data", "digits", "--out", out],
        ["sample", "--run", "missing-run", "--n", "1", "--out-grid", out],
        ["sample", "--run", "missing-run", "--n", "1", "--out-npz", out],
        ["fid", "--samples", "missing.npz", "--data", "digits", "--out", out],
        ["data", "--data", "digits", "--json", out],
    ]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("kind", ["folder", "under-a-file"])
def test_bad_output_path_is_refused_before_any_work(tmp_path, capsys, case, kind):
    (tmp_path / "file").write_text("x")
    out = tmp_path if kind == "folder" else tmp_path / "file" / "out.json"
    argv = _commands(str(out))[case]
    line = one_line_error(capsys, argv)
    option = next(a for a in argv if a in {"--out", "--plot", "--out-grid", "--out-npz", "--json"})
    assert option in line and ("folder" in line or "is a file" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_a_failing_plot_still_writes_the_json(tmp_path, capsys, monkeypatch):
    import lossfloor.plots

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lossfloor.plots, "plot_optimal_loss", fail)
    out, png = tmp_path / "j.json", tmp_path / "j.png"
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--out", str(out), "--plot", str(png)])
    assert "--plot" in line and str(out) in line
    assert len(json.loads(out.read_text())["points"]) == 1 and not png.exists()
