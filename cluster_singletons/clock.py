"""Process time, injectable so loops can be driven by tests without sleeping: the one clock
protocol of the package.

Distributed questions (who leads, what expired) are answered by the database's clock
inside the statement that acts on them; this clock is for pacing, backoff, belief windows
and the timestamps a Snowflake id carries.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

_SPIN_BELOW = 0.002


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def monotonic_ns(self) -> int:
        """The same clock in nanoseconds."""
        ...

    def now(self) -> datetime:
        """The wall-clock time (aware, UTC): when scheduled ticks are due on this node."""
        ...

    def time_ns(self) -> int:
        """Wall-clock nanoseconds since the Unix epoch (may step backwards)."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until ``event`` is set or ``timeout`` seconds pass; return whether it is set."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    monotonic_ns = staticmethod(time.monotonic_ns)
    time_ns = staticmethod(time.time_ns)

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(timeout, 0.0))

    def sleep(self, seconds: float) -> None:
        """Sleep; waits under 2 ms spin (yielding the GIL) so they end within microseconds."""
        if seconds >= _SPIN_BELOW:
            time.sleep(seconds)
            return
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            time.sleep(0)


class FrozenClock:
    """A clock that moves only when told to; ``wait`` and ``sleep`` advance it instead of
    blocking. ``step_wall`` moves the wall clock alone, as NTP or an operator would."""

    def __init__(
        self, start: float = 1000.0, *, wall: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    ) -> None:
        self._start = self._now = start
        self._wall = wall
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._wall + timedelta(seconds=self._now - self._start)

    def time_ns(self) -> int:
        now = self.now()
        return (now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def monotonic_ns(self) -> int:
        return round(self.monotonic() * 1e9)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def step_wall(self, seconds: float) -> None:
        with self._lock:
            self._wall += timedelta(seconds=seconds)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if not event.is_set():
            self.advance(max(timeout, 0.0))
        return event.is_set()

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))
