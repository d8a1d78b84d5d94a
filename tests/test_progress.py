"""Progress output (``lossfloor.progress``): a bar where a person watches, plain lines on a
pipe or in a file (no carriage-return frames), a bounded number of them."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lossfloor.progress import STEPS, ProgressLines, interactive, progress_bar

SRC = Path(__file__).resolve().parent.parent / "src"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines ``lossfloor.progress`` logged (at INFO)."""
    return [r.getMessage() for r in caplog.records if r.name == "lossfloor.progress"]


def test_a_known_total_gives_a_line_per_tenth_of_it(caplog):
    caplog.set_level(logging.INFO, logger="lossfloor")
    bar = ProgressLines(total=37, desc="J*(σ)", unit="block")
    for _ in range(37):
        bar.update()
    bar.set_postfix(sigma="0.5")  # with a total, the next tenth's line says it
    bar.close()
    lines = progress_lines(caplog)
    assert len(lines) == STEPS and not any("\r" in line or "\n" in line for line in lines)
    assert lines[0].startswith("J*(σ): 4/37 block (11%), ")
    assert lines[-1].startswith("J*(σ): 37/37 block (100%), ")


def test_an_unknown_total_gives_a_line_per_stage(caplog):
    caplog.set_level(logging.INFO, logger="lossfloor")
    bar = ProgressLines(desc="J*(σ)", unit="block")
    for sigma in (0.1, 1.0):
        bar.set_postfix(sigma=sigma)
        bar.update(5)
    assert progress_lines(caplog)[1].startswith("J*(σ): 5 block, sigma=1.0, ")


def test_iterating_counts_the_items(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="lossfloor")
    assert list(progress_bar(range(3), desc="held-out σ", unit="σ")) == [0, 1, 2]
    assert progress_lines(caplog)[-1].startswith("held-out σ: 3/3 σ (100%)")


def test_off_a_terminal_the_lines_are_logged_not_printed(monkeypatch):
    """With no logging configured (the library's NullHandler only) nothing reaches stderr."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert list(progress_bar(range(3), desc="held-out σ")) == [0, 1, 2]
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("enabled", [False, None])
def test_off_a_terminal_disabled_or_auto_writes_nothing(monkeypatch, caplog, enabled):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="lossfloor")
    assert list(progress_bar(range(3), enabled=enabled)) == [0, 1, 2]
    assert sys.stderr.getvalue() == "" and progress_lines(caplog) == []


def test_on_a_terminal_it_is_a_bar(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert interactive()
    assert not isinstance(progress_bar(total=3), ProgressLines)
    assert not interactive(io.StringIO()) or "ipykernel" in sys.modules


@pytest.mark.slow
def test_estimate_to_a_pipe_writes_plain_lines(tmp_path):
    """`lossfloor estimate` with stderr to a pipe (a CI log): no carriage return, at most a
    line per tenth of the blocks (and the warnings)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = ["estimate", "--data", "digits", "--limit", "200", "--sigmas", "0.1:10:8",
            "--outer", "512", "--out", str(tmp_path / "c.json")]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "lossfloor", *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("J*(σ)")]
    assert 1 <= len(lines) <= STEPS, proc.stderr
    assert "8/8 block (100%), sigma=10" in lines[-1]  # one 512-draw block per σ
