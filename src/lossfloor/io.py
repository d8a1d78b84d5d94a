"""Atomic output: every file is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lossfloor.errors import UserError


def _temp_beside(target: Path) -> Path:
    """A new empty file next to ``target`` (``.NAME.XXXXXXXX.SUFFIX``: longer than its name),
    readable as the umask allows: the one temporary file of every write."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
    return Path(tmp)


def _reason(exc: OSError) -> str:
    """An OSError in words: its strerror in lower case (ENOENT where the folder exists, as in
    /proc: the file system takes no new files)."""
    if exc.errno == errno.ENOENT:
        return "the file system takes no new files there"
    return (exc.strerror or str(exc)).lower()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success. An
    OSError while writing (full disk, read-only file system) is one line, a ``UserError``."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder for {target}: {_reason(exc)}") from None
    try:
        tmp = _temp_beside(target)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(
    path: str | os.PathLike[str], option: str, siblings: Sequence[str] = (), folder: bool = False
) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written (``option`` names it
    in the one-line message): a folder given for a file (or, with ``folder``, a file given for
    a folder), a path under a file, or a place where writing fails. It is tried by writing:
    the missing folders are made, each temporary file that writing ``path`` and its
    ``siblings`` (``path`` + suffix, e.g. ``.partial``) creates is created and removed, and
    the folders made are removed again. This catches permissions, read-only file systems,
    /proc and /sys, and names too long (ENAMETOOLONG)."""
    target = Path(path)
    try:
        if folder and target.exists() and not target.is_dir():
            raise UserError(f"{option} {target}: is a file; give a folder")
        if not folder and target.is_dir():
            raise UserError(f"{option} {target}: is a folder; give a file name")
        home = target if folder else target.parent
        missing: list[Path] = []
        while not home.exists() and home != home.parent:
            missing.append(home)
            home = home.parent
        if not home.is_dir():
            raise UserError(f"{option} {target}: {home} is a file, not a folder")
    except OSError as exc:  # e.g. a name too long to stat
        raise UserError(f"{option} {target}: cannot write there ({_reason(exc)})") from None
    made: list[Path] = []
    where = home  # the folder written in last
    try:
        for sub in reversed(missing):
            sub.mkdir()
            made.append(sub)
            where = sub
        first = target / ".lossfloor-check" if folder else target
        for name in [first, *(target.with_name(target.name + s) for s in siblings)]:
            _temp_beside(name).unlink()
    except OSError as exc:
        raise UserError(f"{option} {target}: cannot write in {where} ({_reason(exc)})") from None
    finally:
        for sub in reversed(made):
            with suppress(OSError):  # another process has put something there since
                sub.rmdir()


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
