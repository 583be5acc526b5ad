"""Looking for changed schedules, off the leading beat's dispatch thread.

``look`` reads which schedules are paused and a signature of django-celery-beat's tables,
and rereads every schedule when the signature changed (or a full reread is asked for).
The leading beat runs it in a ``Watcher`` thread with its own database connection, so the
digest of a hundred thousand rows (tens of milliseconds of database time) and a reread
(seconds) never hold up a due tick; the engine applies what the watcher saw between two
passes. Driven by a test clock, the engine calls ``look`` itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connections

from cluster_singletons.beat import ledger, periodic_tasks
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.sources import load_all
from cluster_singletons.errors import describe

logger = logging.getLogger("cluster_singletons.beat")


@dataclass(frozen=True)
class Seen:
    """What one look found."""

    paused: frozenset[str]
    signature: object
    #: Every schedule by key; None when the signature said nothing changed.
    found: dict[str, Schedule] | None


def look(
    app: Any,
    *,
    using: str,
    signature: object,
    previous: Mapping[str, Schedule],
    full: bool,
) -> Seen:
    """Paused keys, the sources' signature, and the schedules if it differs from
    ``signature`` (or ``full``)."""
    paused = ledger.paused(using=using)
    seen = periodic_tasks.signature(using)
    if not full and seen == signature:
        return Seen(paused, seen, None)
    return Seen(paused, seen, load_all(app, using=using, previous=previous))


class Watcher:
    """Calls ``look`` every ``interval`` seconds in a thread of its own; ``take`` hands the
    newest result over once."""

    def __init__(self, look: Callable[[], Seen], *, interval: float, using: str) -> None:
        self._look = look
        self._interval = interval
        self._using = using
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: Seen | None = None
        self._thread = threading.Thread(target=self._run, name="beat-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def take(self) -> Seen | None:
        with self._lock:
            seen, self._latest = self._latest, None
        return seen

    def _run(self) -> None:
        failing = False
        try:
            while not self._stop.wait(self._interval):
                connections[self._using].close_if_unusable_or_obsolete()
                try:
                    seen = self._look()
                except DatabaseError as exc:
                    # The dispatch thread learns of an outage from its own fenced writes;
                    # here it only means no news of edits until the database answers.
                    if not failing:
                        logger.warning("looking for changed schedules failed: %s", describe(exc))
                    failing = True
                    continue
                if failing:
                    logger.info("looking for changed schedules works again")
                failing = False
                with self._lock:
                    self._latest = seen
        finally:
            connections.close_all()
