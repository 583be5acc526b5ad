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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, connections

from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.beat import periodic_tasks, schedule_records
from cluster_singletons.beat.schedule import Override, Schedule
from cluster_singletons.beat.sources import load_all
from cluster_singletons.errors import describe

logger = logging.getLogger("cluster_singletons.beat")

#: A watcher that has not completed a look for this many intervals turns the beat's
#: health red.
_STALE = 3


@dataclass(frozen=True)
class Seen:
    """What one look found."""

    paused: frozenset[str]
    signature: object
    #: Every schedule by key; None when the signature said nothing changed.
    found: dict[str, Schedule] | None
    #: Operators' overrides from the schedules' records, by key.
    overrides: Mapping[str, Override] = field(default_factory=dict)


def look(
    app: Any,
    *,
    using: str,
    signature: object,
    previous: Mapping[str, Schedule],
    full: bool,
) -> Seen:
    """Paused keys, operators' overrides, the sources' signature, and the schedules if the
    signature differs from ``signature`` (or ``full``)."""
    paused, set_by_operators = schedule_records.operator_settings(using=using)
    overrides = {
        key: Override(overlap=overlap or None, skip_if_older_than=skip)  # type: ignore[arg-type]
        for key, (overlap, skip) in set_by_operators.items()
    }
    seen = periodic_tasks.signature(using)
    if not full and seen == signature:
        return Seen(paused, seen, None, overrides)
    return Seen(paused, seen, load_all(app, using=using, previous=previous), overrides)


class Watcher:
    """Calls ``look(full=...)`` every ``interval`` seconds in a thread of its own (``full``
    every ``full_every`` seconds); ``take`` hands the newest result over once.

    It survives any exception: logged once per distinct error (with the traceback unless
    the database is down), retried with backoff up to ``backoff_max``; ``problem`` says
    when no look has completed for a while, so the beat's health can turn red.
    """

    def __init__(
        self,
        look: Callable[..., Seen],
        *,
        interval: float,
        using: str,
        full_every: float | None = None,
        backoff_max: float = 10.0,
    ) -> None:
        self._look = look
        self._interval = interval
        self._using = using
        self._full_every = full_every
        self._backoff_max = max(interval, backoff_max)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: Seen | None = None
        self._ok_at = time.monotonic()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="beat-refresh", daemon=True)

    def start(self) -> None:
        self._ok_at = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def take(self) -> Seen | None:
        with self._lock:
            seen, self._latest = self._latest, None
        return seen

    def problem(self, *, stale_after: float | None = None) -> str | None:
        """Why edits may be going unseen: no look completed for over ``stale_after``
        seconds (default: ``_STALE`` intervals; None: all is well)."""
        if stale_after is None:
            stale_after = _STALE * self._interval
        age = time.monotonic() - self._ok_at
        if age <= stale_after:
            return None
        error = self._error
        return f"the schedule watcher has not completed a look for {age:.0f}s" + (
            f" (last error: {error})" if error else ""
        )

    def _run(self) -> None:
        delay, failures = self._interval, 0
        next_full = time.monotonic() + (self._full_every or float("inf"))
        try:
            while not self._stop.wait(delay):
                full = time.monotonic() >= next_full
                try:
                    seen = self._look(full=full)
                except Exception as exc:
                    drop_if_unusable(self._using)
                    self._failed(exc)
                    failures += 1
                    delay = min(self._interval * 2 ** min(failures, 16), self._backoff_max)
                    continue
                if self._error is not None:
                    logger.info("looking for changed schedules works again")
                    self._error = None
                delay, failures = self._interval, 0
                self._ok_at = time.monotonic()
                if full:
                    next_full = self._ok_at + (self._full_every or float("inf"))
                with self._lock:
                    self._latest = seen
        finally:
            connections.close_all()

    def _failed(self, exc: Exception) -> None:
        text = describe(exc)
        if text != self._error:
            if isinstance(exc, DatabaseError):
                # The dispatch thread learns of an outage from its own fenced writes; here
                # it only means no news of edits until the database answers.
                logger.warning("looking for changed schedules failed: %s", text)
            else:
                logger.exception("looking for changed schedules failed: %s", text)
        self._error = text
