"""Process time, injectable so loops can be driven by tests without sleeping.

Distributed questions (who leads, what expired) are answered by the database's clock
inside the statement that acts on them; this clock is only for pacing and backoff.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until ``event`` is set or ``timeout`` seconds pass; return whether it is set."""
        ...

    def now(self) -> datetime:
        """The wall-clock time (aware, UTC): when scheduled ticks are due on this node."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(timeout, 0.0))

    def now(self) -> datetime:
        return datetime.now(UTC)


class FrozenClock:
    """A clock that moves only when told to; ``wait`` advances it instead of sleeping."""

    def __init__(
        self, start: float = 1000.0, *, wall: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    ) -> None:
        self._start = self._now = start
        self._wall = wall
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._wall + timedelta(seconds=self._now - self._start)

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
