"""Process time, injectable so loops can be driven by tests without sleeping.

Distributed questions (who leads, what expired) are answered by the database's clock
inside the statement that acts on them; this clock is only for pacing and backoff.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until ``event`` is set or ``timeout`` seconds pass; return whether it is set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(timeout, 0.0))


class FrozenClock:
    """A clock that moves only when told to; ``wait`` advances it instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if not event.is_set():
            self.advance(max(timeout, 0.0))
        return event.is_set()
