"""Start-up: each command imports only what it uses (checked in fresh interpreters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lossfloor.cli import SUBCOMMANDS

# Packages only some code paths need: FID/KID, training, plots, splines, the digits decoder.
HEAVY = {"torchmetrics", "diffusers", "matplotlib", "scipy", "sklearn"}


def _imported(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Top-level packages in sys.modules after running ``code`` in a fresh interpreter."""
    probe = (
        "import contextlib, io, json, sys\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def _main(*argv: str) -> str:
    """Code that runs ``lossfloor argv`` in the probe (--help's SystemExit included)."""
    call = f"main({list(argv)!r})"
    return f"from lossfloor.cli import main\ntry:\n    {call}\nexcept SystemExit:\n    pass"


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_cli_modules_import_no_heavy_package(name):
    assert not _imported(f"import lossfloor.cli.{name}") & HEAVY


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        *[(name, "--help") for name in SUBCOMMANDS],
        ("--help",),
    ],
    ids=" ".join,
)
def test_help_does_not_import_torch_or_numpy(argv):
    imported = _imported(_main(*argv))
    assert "lossfloor" in imported and not imported & {"torch", "numpy", *HEAVY}


def test_lossfloor_package_is_light():
    assert not _imported("import lossfloor, lossfloor.errors, lossfloor.io") & {"torch", "numpy"}


@pytest.mark.slow
def test_commands_on_cached_digits_import_no_sklearn_nor_evaluation_or_training(tmp_path):
    env = {"LOSSFLOOR_CACHE": str(tmp_path)}
    first = _imported(_main("data", "--data", "digits"), env)
    assert "sklearn" in first  # decoded once...
    data = _imported(_main("data", "--data", "digits"), env)
    assert "torch" in data and not data & HEAVY  # ...then memory-mapped from the cache
    estimate = _main("estimate", "--data", "digits", "--sigmas", "1", "--outer", "10", "--quiet")
    assert not _imported(estimate, env) & (HEAVY - {"matplotlib"})


@pytest.mark.slow
def test_estimate_without_plot_does_not_import_matplotlib(tmp_path):
    estimate = _main("estimate", "--data", "digits", "--sigmas", "1", "--outer", "10", "--quiet")
    assert "matplotlib" not in _imported(estimate, {"LOSSFLOOR_CACHE": str(tmp_path)})
