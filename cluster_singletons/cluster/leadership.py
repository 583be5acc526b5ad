"""What leader work receives: ``Leadership``, its view of one term of one lease.

``running`` turns false as soon as the term ends, the runner stops, or the runner's
belief window closes (checked directly, so a process resumed after a pause stops acting
before its coordinator runs again); ``fenced()`` is a transaction that commits only
within the term; ``clock`` is the runner's estimate of the database's clock
(``database_clock``), the one the beat plans and publishes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term


@dataclass(frozen=True, kw_only=True)
class Leadership:
    """What leader work receives: its term, a stop signal, and fenced transactions."""

    term: Term
    stop_event: threading.Event
    using: str
    ttl: float
    #: Whether the runner's belief window for this term is still open, by its own clock;
    #: checked directly so a process resumed after a pause stops acting at once, before
    #: its coordinator thread has run.
    believed: Callable[[], bool] = field(default=lambda: True)
    #: The database's clock as the runner estimates it (tests: any clock).
    clock: Clock = field(default_factory=SystemClock)

    @property
    def running(self) -> bool:
        """False once the term ended, its belief window closed, or the runner is stopping."""
        return not self.stop_event.is_set() and self.believed()

    def sleep(self, seconds: float | None) -> bool:
        """Sleep (``None``: until the term ends), waking early when the term ends;
        return whether still running."""
        return not self.stop_event.wait(seconds)

    def fenced(self) -> AbstractContextManager[None]:
        """A transaction that commits only within this term (else ``LeadershipLost``)."""
        return fencing.fenced(self.term, using=self.using, ttl=self.ttl)


LeaderWork = Callable[[Leadership], None]


def idle(leadership: Leadership) -> None:
    """Leader work that does nothing but hold the lease until its term ends."""
    leadership.stop_event.wait()
