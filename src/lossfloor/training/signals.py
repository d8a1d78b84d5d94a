"""Stop requests during training: SIGINT and SIGTERM end the run between steps, where its state
is whole (the trainer then checkpoints it)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequests:
    """While active, SIGINT and SIGTERM only set ``requested`` (the loop stops between steps,
    where the state is whole); outside the main thread signals are left alone."""

    def __init__(self) -> None:
        self.requested = False
        self.agreed = False  # several processes: whether any had been asked (Trainer._train_step)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        self.requested = self.agreed = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
