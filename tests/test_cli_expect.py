"""Issue 14, the rest: error wording, plots that mark floored values, J* at huge σ in float64,
reusing an estimate in diagnose, CSV tables, help texts and progress lines (through the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from lossfloor.cli import main
from test_cli_hardening import one_line_error


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
