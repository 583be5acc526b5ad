"""Leadership of one lease by one runner: what leader work receives, and the slot that runs it.

- ``Leadership`` is the work's view of its term: ``running`` turns false as soon as the
  term ends, the runner stops, or the runner's belief window closes (checked directly, so
  a process resumed after a pause stops acting before its coordinator runs again).
- A ``Slot`` runs the work in a thread of its own and records how it ended (returned,
  failed, fenced out); the runner's coordinator decides what follows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal

from django.db import connections

from cluster_singletons.clock import Clock
from cluster_singletons.cluster import leases
from cluster_singletons.cluster.leases import Term
from cluster_singletons.errors import LeadershipLost

#: Work's outcomes are logged as the runner's: one place to read who leads and why not.
logger = logging.getLogger("cluster_singletons.runner")


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
        return leases.fenced(self.term, using=self.using, ttl=self.ttl)


LeaderWork = Callable[[Leadership], None]
Outcome = Literal["running", "returned", "failed", "fenced-out"]


def idle(leadership: Leadership) -> None:
    """Leader work that does nothing but hold the lease until its term ends."""
    leadership.stop_event.wait()


@dataclass(kw_only=True)
class Slot:
    """A lease a runner stands for, its current term and the thread of its leader work."""

    name: str
    work: LeaderWork
    term: Term | None = None
    believed_until: float = 0.0
    next_acquire: float = 0.0
    thread: threading.Thread | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome = "running"
    restart_at: float | None = None
    crashes: int = 0

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start_work(
        self, *, using: str, ttl: float, clock: Clock, on_end: Callable[[], None]
    ) -> None:
        """Run the work for the current term in a thread of its own; ``on_end`` when it ends."""
        term = self.term
        assert term is not None
        self.stop_event = threading.Event()
        self.outcome, self.restart_at = "running", None
        leadership = Leadership(
            term=term,
            stop_event=self.stop_event,
            using=using,
            ttl=ttl,
            believed=lambda: self.term is term and clock.monotonic() < self.believed_until,
        )
        self.thread = threading.Thread(
            target=self._run, args=(leadership, on_end), name=f"lead:{self.name}", daemon=True
        )
        self.thread.start()

    def _run(self, leadership: Leadership, on_end: Callable[[], None]) -> None:
        try:
            self.work(leadership)
            self.outcome = "returned"
        except LeadershipLost as exc:
            logger.warning("fenced write refused: %s", exc)
            self.outcome = "fenced-out"
        except Exception:
            logger.exception("leader work for %r failed", self.name)
            self.outcome = "failed"
        finally:
            connections.close_all()
            on_end()
