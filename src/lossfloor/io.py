"""Atomic output: every file is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lossfloor.errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder for {target}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | os.PathLike[str], option: str) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: a folder, a path
    under a file, or a folder without write permission (``option`` names it in the message)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {target}: is a folder; give a file name")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # atomic_path creates the missing folders below this one
    if not folder.is_dir():
        raise UserError(f"{option} {target}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {target}: cannot write in {folder} (permission denied)")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv(
    path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Write a header row and ``rows`` as CSV, atomically: floats in full precision (repr),
    None as an empty cell."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON, turning a missing or malformed file into a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def save_with(path: str | os.PathLike[str], save: Callable[[Path], None]) -> None:
    """Call ``save(tmp_path)`` (e.g. ``fig.savefig``, ``torch.save``) and rename atomically."""
    with atomic_path(path) as tmp:
        save(tmp)
