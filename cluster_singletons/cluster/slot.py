"""A lease a runner stands for: its current term and the thread that runs its leader work.

The coordinator owns the slots; a ``Slot`` runs the work in a thread of its own and
records how it ended (returned, failed, fenced out). What follows is the coordinator's
decision (``decisions``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from django.db import connections

from cluster_singletons._connection import DATABASE_ERRORS
from cluster_singletons.clock import Clock
from cluster_singletons.cluster.decisions import Ended, SlotState
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import Leadership, LeaderWork
from cluster_singletons.errors import LeadershipLost, describe

Outcome = Literal["running", "returned", "failed", "fenced-out"]


#: Work's outcomes are logged as the runner's: one place to read who leads and why not.
logger = logging.getLogger("cluster_singletons.runner")


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

    def state(self) -> SlotState:
        """This slot as the coordinator's decisions see it."""
        ended: Ended | None = None
        if (
            self.term is not None
            and self.restart_at is None
            and self.thread is not None
            and not self.alive
            and not self.stop_event.is_set()
            and self.outcome != "running"
        ):
            ended = self.outcome
        return SlotState(
            name=self.name,
            leading=self.term is not None,
            believed_until=self.believed_until,
            next_acquire=self.next_acquire,
            restart_at=self.restart_at,
            working=self.alive,
            ended=ended,
            crashes=self.crashes,
        )

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
            clock=clock,
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
        except DATABASE_ERRORS as exc:
            # The database went away under it: one line, not a traceback per restart.
            logger.warning(
                "leader work for %r stopped: database error (%s)", self.name, describe(exc)
            )
            self.outcome = "failed"
        except Exception:
            logger.exception("leader work for %r failed", self.name)
            self.outcome = "failed"
        finally:
            connections.close_all()
            on_end()
