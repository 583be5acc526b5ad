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
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
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
    bystanders: Bystanders | None = None,
) -> Seen:
    """Paused keys, operators' overrides, the sources' signature, and the schedules if the
    signature differs from ``signature`` (or ``full``); ``bystanders`` looks for another
    scheduler writing django-celery-beat's bookkeeping meanwhile."""
    if bystanders is not None:
        bystanders.look()
    paused, set_by_operators = schedule_records.operator_settings(using=using)
    overrides = {
        key: Override(overlap=overlap or None, skip_if_older_than=skip)  # type: ignore[arg-type]
        for key, (overlap, skip) in set_by_operators.items()
    }
    seen = periodic_tasks.signature(using)
    if not full and seen == signature:
        return Seen(paused, seen, None, overrides)
    return Seen(paused, seen, load_all(app, using=using, previous=previous), overrides)


class Bystanders:
    """Another scheduler dispatching django-celery-beat's rows while this beat leads (a
    DatabaseScheduler left running in a rolling deploy: every tick runs twice), seen in
    the rows' run bookkeeping; each look that sees it logs one WARNING. This process's
    own ``record_runs`` never counts. Compared with the term's first look:

    - a row saved with a ``last_run_at`` newer than every one at the first look that this
      process did not write (DatabaseScheduler saves its rows' last runs every few
      minutes and when it stops);
    - ``total_run_count`` summed over the rows moved by other than the runs this process
      counted (a row added or deleted starts that sum again).

    An edit in the admin saves a row with the last run it had, so it is not taken for one.
    """

    #: Rows saved this long before the newest save seen are read again (clocks differ).
    SLACK = timedelta(seconds=60)

    def __init__(self, *, using: str) -> None:
        self._using = using
        self._last: periodic_tasks.Bookkeeping | None = None
        self._first_last_run: datetime | None = None
        self._seen: set[tuple[str, datetime]] = set()

    def look(self) -> str | None:
        """Compare with the previous look; the warning logged (None: nothing seen)."""
        if not apps.is_installed("django_celery_beat"):
            return None
        last = self._last
        after = last.last_saved - self.SLACK if last and last.last_saved else None
        seen = periodic_tasks.bookkeeping(using=self._using, saved_after=after)
        if seen is None:  # one of our own writes was under way: the next look decides
            return None
        self._last = seen
        if last is None:
            self._first_last_run = seen.last_run_at
            return None
        found = []
        runs = (seen.runs - last.runs) - (seen.ours - last.ours)
        if runs and seen.rows == last.rows:
            found.append(f"{runs:+d} run(s) counted")
        for name, ran in seen.saved:
            first = self._first_last_run
            if ran is None or (first is not None and ran <= first) or (name, ran) in self._seen:
                continue
            if seen.our_last_runs.get(name) != ran:
                self._seen.add((name, ran))
                found.append(f"{name!r} run at {ran.isoformat()}")
        if not found:
            return None
        warning = (
            f"django-celery-beat's bookkeeping moved without this beat ({', '.join(found)} "
            "by someone else): another scheduler, such as a DatabaseScheduler still "
            "running, is dispatching the same schedules, so they run twice; stop it "
            "(README: Coming from django-celery-beat)"
        )
        logger.warning(warning)
        return warning


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
