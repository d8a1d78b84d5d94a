"""The library never prints: its notes and progress lines are records of the ``lossfloor.*``
loggers (silent unless the program configures logging), and the CLI turns them into the
stderr lines it always wrote."""

from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path

import pytest
import torch
from test_cli_hardening import interrupted_after_first_sigma

from lossfloor.cli import main
from lossfloor.optimal.estimate import estimate_curve

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "lossfloor"

#: (file, function) → why it may name sys.stderr / sys.stdout.
ALLOWED = {
    ("progress.py", "interactive"): "asks whether a person watches stderr (isatty): no output",
    ("progress.py", "progress_bar"): "the tqdm bar drawn on the terminal a person watches",
}


def _stream_uses(path: Path) -> list[tuple[str, int, str]]:
    """(enclosing function, line, what) of each print call and sys.stdout/sys.stderr use."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        if is_call and node.func.id == "print":
            found.append((function, node.lineno, "print("))
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
            and node.attr in ("stdout", "stderr")
        ):
            found.append((function, node.lineno, f"sys.{node.attr}"))
        if isinstance(node, ast.ImportFrom) and node.module == "sys":
            for alias in node.names:
                if alias.name in ("stdout", "stderr"):
                    found.append((function, node.lineno, f"from sys import {alias.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(), str(path)), "<module>")
    return found


def test_library_code_outside_the_cli_never_prints_or_names_stdout_or_stderr():
    files = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 20  # the scan sees the package, not an empty folder
    offending = [
        f"{path.relative_to(PACKAGE)}:{line} {what} (in {function})"
        for path in files
        for function, line, what in _stream_uses(path)
        if (path.name, function) not in ALLOWED
    ]
    assert offending == []


def test_the_scan_finds_a_print_and_a_stderr_write(tmp_path):
    """The scan itself can fail: it catches both forms it forbids."""
    source = tmp_path / "m.py"
    source.write_text("import sys\ndef f():\n    print('x', file=sys.stderr)\n")
    assert _stream_uses(source) == [("f", 3, "print("), ("f", 3, "sys.stderr")]


def test_a_resumed_estimate_writes_nothing_without_logging_configured(
    tmp_path, capsys, caplog, monkeypatch
):
    """In process, progress on and stderr no terminal: the resume note and the progress lines
    are logged at INFO, and nothing reaches stdout or stderr."""
    assert not sys.stderr.isatty() and "ipykernel" not in sys.modules
    data = torch.randn(60, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    checkpoint = tmp_path / "curve.partial"

    def first() -> None:
        with pytest.raises(KeyboardInterrupt):
            estimate_curve(data, [0.1, 2.0], checkpoint=checkpoint, progress=True)

    interrupted_after_first_sigma(monkeypatch, first)
    assert checkpoint.exists()
    capsys.readouterr()
    estimate_curve(data, [0.1, 2.0], checkpoint=checkpoint, progress=True)
    assert capsys.readouterr() == ("", "")

    # The same run with INFO records kept: the note was there to print, and was not printed.
    interrupted_after_first_sigma(monkeypatch, first)
    caplog.set_level(logging.INFO, logger="lossfloor")
    estimate_curve(data, [0.1, 2.0], checkpoint=checkpoint, progress=True)
    messages = [r.getMessage() for r in caplog.records]
    assert f"resuming: 1 of 2 σ already computed in {checkpoint} (σ = 0.1)" in messages
    assert any(m.startswith("J*(σ) in blocks") and "(100%)" in m for m in messages)
    assert capsys.readouterr() == ("", "")


def _estimate(out: Path, *extra: str) -> list[str]:
    return ["estimate", "--data", "digits", "--limit", "100", "--sigmas", "0.1,2",
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("quiet", [False, True])
def test_the_cli_writes_the_resume_note_and_progress_lines_on_stderr(
    tmp_path, capsys, monkeypatch, quiet
):
    """Through the CLI the same records are stderr lines, worded as before (the note's text is
    the one the library printed); --quiet keeps warnings only: no note, no progress."""
    out = tmp_path / "run.json"
    extra = ["--quiet"] if quiet else []
    interrupted_after_first_sigma(monkeypatch, lambda: main(_estimate(out, *extra)))
    partial = out.with_name("run.json.partial")
    assert partial.exists()
    capsys.readouterr()
    assert main(_estimate(out, *extra)) == 0
    err = capsys.readouterr().err.splitlines()
    note = f"resuming: 1 of 2 σ already computed in {partial} (σ = 0.1)"
    assert (note in err) is not quiet
    assert any(line.startswith("J*(σ) in blocks") and "(100%)" in line for line in err) is not quiet
    # main restores the logger: a later in-process library call is silent again.
    logger = logging.getLogger("lossfloor")
    assert logger.propagate and logger.level == logging.NOTSET
    assert [type(h) for h in logger.handlers] == [logging.NullHandler]
