"""Progress output, decided in one place: a tqdm bar where a person watches (a terminal, a
notebook), plain lines elsewhere (CI logs, ``lossfloor estimate 2> log``), where a bar's
carriage-return frames would fill the file.

The plain lines are INFO records of the ``lossfloor.progress`` logger, never prints: a program
that configures no logging sees none, and the CLI shows them on stderr. The bar is no print
either: it is drawn on the terminal or notebook a person watches, which tqdm redraws in place.

``progress_bar`` takes tqdm's arguments for what the library uses (an iterable or a total,
``desc``, ``unit``, ``leave``, ``initial``, ``dynamic_ncols``) and returns an object with
tqdm's ``update``, ``set_postfix``, ``close`` and iteration. Off a terminal it writes one line
per tenth of the total (at most 10), or, with no total, one per ``set_postfix`` call (a new σ)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

log = logging.getLogger(__name__)

#: Lines off a terminal: one each time the work done crosses another 1/STEPS of the total.
STEPS = 10


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a person watches ``stream`` (default stderr): a terminal, or a notebook kernel."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) or "ipykernel" in sys.modules


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = True,
    **tqdm_options: Any,
) -> Any:
    """A tqdm bar on a terminal or notebook, else ``ProgressLines`` (logged); ``enabled``
    False: nothing; None: a bar on a terminal and nothing elsewhere."""
    from tqdm.auto import tqdm

    if interactive() and enabled is not False:
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, **tqdm_options)
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    return ProgressLines(iterable, total=total, desc=desc, unit=unit, **tqdm_options)


class ProgressLines:
    """tqdm's interface, logging plain lines ``desc: done/total unit (p%), postfix, 12s`` at
    INFO."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        initial: float = 0,
        **_ignored: Any,  # a bar's looks (leave, dynamic_ncols, ...): nothing to draw here
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.postfix = initial, ""
        self.start, self.shown = time.monotonic(), self._step()

    def _step(self) -> int:
        """The tenths of the total done (−1 without a total)."""
        if not self.total:
            return -1
        return int(STEPS * min(self.n, self.total) / self.total)

    def _write(self) -> None:
        done = f"{self.n:g}" if self.total is None else f"{self.n:g}/{self.total:g}"
        share = "" if not self.total else f" ({100 * self.n / self.total:.0f}%)"
        postfix = f", {self.postfix}" if self.postfix else ""
        head = f"{self.desc}: " if self.desc else ""
        seconds = time.monotonic() - self.start
        line = f"{head}{done} {self.unit}{share}{postfix}, {seconds:.0f}s"
        log.info("%s", line)

    def update(self, n: float = 1) -> None:
        self.n += n
        step = self._step()
        if step > self.shown:
            self.shown = step
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self.total is None:
            self._write()

    def close(self) -> None:
        """Nothing to clear: the last line stays."""

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
