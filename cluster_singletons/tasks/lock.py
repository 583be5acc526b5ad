"""What a running singleton task holds: ``self.cluster_lock``.

A ``ClusterLock`` is one term of one task key's lease (its holder, the process running
the body, and its epoch). The holder's keeper thread renews it while the body runs and
marks it ``lost`` when a renewal finds the term over; ``fenced()`` is the authority
either way: its transaction commits only while the term is current by the database's
clock, so a process paused past the TTL resumes to find its writes refused
(``LeadershipLost``).
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.pacing import belief_window
from cluster_singletons.tasks.keys import TaskKey


@dataclass(kw_only=True, eq=False)
class ClusterLock:
    """The key a task's body runs under, while it runs."""

    key: TaskKey
    term: Term
    task_id: str | None
    using: str
    ttl: float
    #: When it was taken (monotonic), for the hold-duration metric.
    taken_at: float = field(default_factory=time.monotonic)
    _believed_until: float = 0.0
    _lost: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.renewed(self.taken_at)

    @property
    def epoch(self) -> int:
        """The fencing token: it rises every time the key changes hands."""
        return self.term.epoch

    @property
    def lease(self) -> str:
        return self.term.name

    @property
    def held(self) -> bool:
        """Whether this process may still believe it holds the key (a hint: only
        ``fenced()`` decides)."""
        return not self._lost.is_set() and time.monotonic() < self._believed_until

    @property
    def lost(self) -> bool:
        """A renewal found the term over."""
        return self._lost.is_set()

    def fenced(self) -> AbstractContextManager[None]:
        """A transaction that commits only while this term is current; ``LeadershipLost``
        (before the body runs) otherwise. Keep it short: it delays the key's renewal."""
        return fencing.fenced(self.term, using=self.using, ttl=self.ttl)

    # -- the holder's side ------------------------------------------------------------

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` (monotonic) kept the term."""
        self._believed_until = sent_at + belief_window(self.ttl)

    def mark_lost(self) -> None:
        self._lost.set()

    def __repr__(self) -> str:
        return f"ClusterLock({self.key.task!r}, key={self.key.value}, epoch={self.epoch})"
