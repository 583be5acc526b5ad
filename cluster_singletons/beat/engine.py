"""The beat engine: what the leader of the ``beat`` lease runs.

One pass (``step``) at wall-clock time ``now``:

1. publish the recorded runs now due (``outbox``: their messages were built when they
   were recorded, so only the broker round trips are left, one per batch);
2. take what the refresh thread saw (``refresh``: which schedules are paused, and, when
   django-celery-beat's rows changed, every schedule, reread); apply it;
3. pop the schedules due by ``now + beat_lookahead`` from a heap and plan each (a tick
   ahead is planned for its own time): missed ticks older than ``skip_if_older_than``
   become one ``skipped`` row, the newer ones one run (coalesced); a run whose
   predecessor has not finished follows the overlap policy, decided when the tick is due
   unless the predecessor has already finished;
4. record the batch in the ledger in one transaction fenced on the beat's term, move the
   runs into the outbox and publish those already due; mark published what went out;
   intents left ``pending`` and due (a crash, the broker down, a manual run) are
   published again, same task id;
5. dispatch delayed deliveries that are due, through the same ledger.

The cost of a pass grows with the ticks due, not with the number of schedules: the heap
holds each schedule's next due time; nothing scans all schedules except the refresh,
which runs in its own thread.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from django.apps import apps
from django.db import connections

from cluster_singletons import metrics, names
from cluster_singletons.beat import (
    deliveries,
    ledger,
    outbox,
    periodic_tasks,
    planning,
    refresh,
    schedule_records,
    sources,
)
from cluster_singletons.beat.catalog import Catalog
from cluster_singletons.beat.planning import Entry
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.cluster import heartbeats
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import describe
from cluster_singletons.models import Run

logger = logging.getLogger("cluster_singletons.beat")

_FULL_REFRESH = 60.0
_PENDING_POLL = 1.0
_DELIVERY_POLL = 0.5
_MAX_BATCH = 5000
#: Schedules planned ahead of their tick per pass at most, so that recording a burst
#: ahead (a thousand crontabs due at the same second) never holds up runs already due.
_AHEAD_PER_PASS = 100
_HEARTBEAT_EVERY = 1.0
#: How often the leading beat takes what the refresh thread saw.
_TAKE_EVERY = 0.25
_NEVER = datetime.max.replace(tzinfo=UTC)
#: A watcher that has not completed a look for this many refresh intervals turns the
#: beat's health red.
_WATCHER_STALE = 3


class BeatEngine:
    """Schedules, the heap of due times, and the ledger writes of one leader term."""

    def __init__(
        self,
        app: Any,
        *,
        settings: ClusterSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or get_settings()
        self.clock: Clock = clock or SystemClock()
        self.using = self.settings.database
        self.catalog = Catalog()
        self._policy = planning.Policy(
            skip_if_older_than=self.settings.skip_if_older_than, overlap=self.settings.overlap
        )
        self._lookahead = timedelta(seconds=self.settings.beat_lookahead)
        self._paused: frozenset[str] = frozenset()
        self._signature: object = None
        self._watcher: refresh.Watcher | None = None
        self._bystanders = refresh.Bystanders(using=self.using)
        self._next_refresh = self._next_full = self._next_pending = self._next_delivery = (
            self.clock.now()
        )
        self._upcoming: dict[int, datetime] = {}
        self._next_heartbeat = self.clock.now()
        self._digested = connections[self.using].vendor == "postgresql"
        self._outbox = outbox.Outbox(
            app, using=self.using, clock=self.clock, after_publish=self._after_publish
        )

    # -- hosting -----------------------------------------------------------------------

    def run(self, leadership: Leadership) -> None:
        """Leader work for the ``beat`` lease: load, then step until the term ends."""
        self.start(leadership)
        # What was just loaded lives as long as the term: keep the collector from walking it
        # (a full collection over a hundred thousand schedules stalls dispatch ~0.3 s).
        gc.collect()
        gc.freeze()
        self._watcher = refresh.Watcher(
            self._look,
            interval=self.settings.beat_refresh_interval,
            using=self.using,
            # Off PostgreSQL the signature misses bulk update()s: reread everything too.
            full_every=None if self._digested else _FULL_REFRESH,
            backoff_max=self.settings.retry_backoff_max,
        )
        self._watcher.start()
        try:
            window = self.settings.beat_batch_window
            while leadership.running:
                started = self.clock.now()
                wake = max(self.step(leadership), started + timedelta(seconds=window))
                delay = (wake - self.clock.now()).total_seconds()
                if delay > 0:
                    leadership.sleep(delay)
        finally:
            self._watcher.stop()
            self._watcher = None
            self._outbox.close()
            gc.unfreeze()

    def start(self, leadership: Leadership) -> None:
        now = self.clock.now()
        self.catalog.clear()
        self._outbox.clear()
        sources.mirror(self.app, using=self.using)  # as DatabaseScheduler does at its start
        self._apply(self._look(full=True), now, leadership.term, first=True)
        self._open_runs(now)
        # Take over what a previous leader recorded and did not publish, including ticks
        # it recorded ahead: those go out when due.
        self._republish(now, leadership, ahead=self._lookahead)
        logger.info(
            "beat leader (epoch %s): %d schedules, next due %s",
            leadership.term.epoch,
            len(self.catalog),
            due.isoformat() if (due := self.catalog.next_due) else "never",
        )

    # -- one pass ----------------------------------------------------------------------

    def step(self, leadership: Leadership) -> datetime:
        """One pass at the clock's ``now``; returns when the next one is due."""
        now = self.clock.now()
        self._publish_due(now, leadership)
        if now >= self._next_refresh:
            self._refresh(now, leadership.term)
        horizon = now + self._lookahead
        due = self.catalog.pop_due(now, horizon, limit=_MAX_BATCH, ahead_limit=_AHEAD_PER_PASS)
        if due:
            self._dispatch_due(due, now, leadership)
        if now >= self._next_pending:
            self._republish(now, leadership)
        if now >= min(self._next_delivery, self._next_upcoming):
            self._deliver(now, leadership)
        if now >= self._next_heartbeat:
            self._heartbeat(now, leadership.term)
        wake = [self._next_refresh, self._next_pending, self._next_delivery, self._next_upcoming]
        if (first := self.catalog.next_due) is not None:
            wake.append(first - self._lookahead)
        if (waiting := self.catalog.next_waiting) is not None:
            wake.append(waiting)
        if self._outbox.next_at is not None:
            wake.append(self._outbox.next_at)
        return min(wake)

    @property
    def _next_upcoming(self) -> datetime:
        """When the first delivery already fetched falls due (far future: none)."""
        return min(self._upcoming.values(), default=_NEVER)

    def _heartbeat(self, now: datetime, term: Term) -> None:
        """The beat's own freshness: a leader whose loop hangs stops writing this, and one
        whose watcher cannot look for edits writes why (the beat's health turns red)."""
        self._next_heartbeat = now + timedelta(seconds=_HEARTBEAT_EVERY)
        interval = self.settings.beat_refresh_interval
        watcher = self._watcher
        problem = watcher.problem(stale_after=_WATCHER_STALE * interval) if watcher else None
        heartbeats.record(
            names.BEAT,
            runner_id=term.runner_id,
            epoch=term.epoch,
            interval=interval,
            error=problem,
            using=self.using,
        )

    # -- planning ----------------------------------------------------------------------

    def _dispatch_due(self, due: list[Entry], now: datetime, leadership: Leadership) -> None:
        open_ids = [e.open_run for e in due if e.open_run is not None and self._waits_for(e)]
        done = ledger.finished(open_ids, using=self.using) if open_ids else set()
        intents: list[ledger.Intent] = []
        last_ticks: dict[str, datetime] = {}
        planned: list[Entry] = []
        broken: list[Schedule] = []
        for entry in due:
            if entry.open_run is not None and (
                entry.open_run in done
                or (now - (entry.open_since or now)).total_seconds() > self.settings.overlap_timeout
            ):
                entry.open_run = entry.open_since = None
            at = max(now, entry.due or now)
            if at > now and entry.open_run is not None and self._waits_for(entry):
                self.catalog.push(entry, waiting=True)  # the policy decides when it is due
                continue
            before = entry.last_tick
            paused = entry.schedule.key in self._paused
            try:
                intents.extend(planning.plan(entry, at, paused=paused, policy=self._policy))
            except Exception as exc:  # this schedule only: flagged, the others go on
                problem = f"its ticks cannot be planned: {describe(exc)}"
                broken.append(self.catalog.break_(entry, problem))
                continue
            if entry.last_tick is not None and entry.last_tick != before:
                last_ticks[entry.schedule.key] = entry.last_tick
            planned.append(entry)
        rows = ledger.record(
            intents,
            last_ticks=last_ticks,
            term=leadership.term,
            using=self.using,
            ttl=self.settings.lease_ttl,
        )
        for row in rows:
            if row.status == Run.Status.SKIPPED:
                reason = "overlap" if row.reason.startswith("overlap") else "catch_up"
                metrics.TICKS_SKIPPED.labels(metrics.schedule_label(row.schedule), reason).inc(
                    row.ticks
                )
        pending = [r for r in rows if r.status == Run.Status.PENDING]
        for run in pending:
            opened = self.catalog.entries.get(run.schedule)
            if opened is not None:
                opened.open_run, opened.open_since = run.task_id, max(now, run.tick)
        for entry in planned:
            self.catalog.push(entry)
        if broken:
            self._flag(broken, now, leadership.term)
        self._enqueue(pending, now, leadership)

    def _waits_for(self, entry: Entry) -> bool:
        """Whether the schedule's overlap policy waits for its previous run to finish."""
        return self._policy.overlap_of(entry.schedule) != "allow_all"

    # -- publishing --------------------------------------------------------------------

    def _enqueue(self, runs: list[Run], now: datetime, leadership: Leadership) -> None:
        """Hand recorded runs to the outbox (their messages are built now) and publish
        those due; if the broker cannot be asked, they stay pending and the retry poll
        picks them up."""
        if runs and not self._outbox.add(runs, leadership.term, self.catalog.functions):
            self._broker_failed()
        self._publish_due(now, leadership)

    def _publish_due(self, now: datetime, leadership: Leadership) -> None:
        if not self._outbox.publish_due(now, leadership):
            self._broker_failed()

    def _broker_failed(self) -> None:
        self._next_pending = self.clock.now() + timedelta(seconds=self.settings.retry_backoff_max)

    def _after_publish(self, runs: list[Run]) -> None:
        """Keep django-celery-beat's bookkeeping true for its admin: last run, run count,
        and one-off tasks disabled once run."""
        names = [r.schedule.partition(":")[2] for r in runs if r.schedule.startswith("periodic:")]
        if not names or not apps.is_installed("django_celery_beat"):
            return
        one_off = [
            n
            for n in names
            if (e := self.catalog.entries.get(f"periodic:{n}")) and e.schedule.one_off
        ]
        periodic_tasks.record_runs(names, one_off=one_off, at=self.clock.now(), using=self.using)

    def _republish(
        self, now: datetime, leadership: Leadership, *, ahead: timedelta = timedelta(0)
    ) -> None:
        """Publish intents left pending and due by ``now + ahead``: by a crashed leader, a
        broker outage, a manual run (the outbox's own runs are left to it)."""
        self._next_pending = now + timedelta(seconds=_PENDING_POLL)
        runs = [
            r
            for r in ledger.pending(until=now + ahead, using=self.using)
            if r.task_id not in self._outbox.task_ids
        ]
        if runs:
            logger.info("publishing %d pending intent(s) with their recorded task ids", len(runs))
            self._enqueue(runs, now, leadership)

    # -- delayed delivery --------------------------------------------------------------

    def _deliver(self, now: datetime, leadership: Leadership) -> None:
        if now >= self._next_delivery:
            self._next_delivery = now + timedelta(seconds=_DELIVERY_POLL)
            self._upcoming = deliveries.upcoming(
                before=self._next_delivery, using=self.using, limit=_MAX_BATCH
            )
        ready = [i for i, at in self._upcoming.items() if at <= now]
        if not ready:
            return
        for delivery_id in ready:
            del self._upcoming[delivery_id]
        rows = deliveries.claim(
            ready, term=leadership.term, using=self.using, ttl=self.settings.lease_ttl
        )
        self._enqueue(rows, now, leadership)

    # -- loading -----------------------------------------------------------------------

    def _look(self, *, full: bool = False) -> refresh.Seen:
        return refresh.look(
            self.app,
            using=self.using,
            signature=self._signature,
            previous=self.catalog.schedules,
            full=full,
            bystanders=self._bystanders,
        )

    def _refresh(self, now: datetime, term: Term) -> None:
        """Apply what the refresh thread saw; without one (a test's clock), look now."""
        interval = self.settings.beat_refresh_interval
        if self._watcher is not None:
            # It looks every interval; what it saw is taken within a fraction of one.
            self._next_refresh = now + timedelta(seconds=min(interval, _TAKE_EVERY))
            seen = self._watcher.take()
        else:
            self._next_refresh = now + timedelta(seconds=interval)
            seen = self._look(full=now >= self._next_full and not self._digested)
        if seen is not None:
            self._apply(seen, now, term)

    def _apply(self, seen: refresh.Seen, now: datetime, term: Term, *, first: bool = False) -> None:
        self._paused = seen.paused
        self._policy = replace(self._policy, overrides=seen.overrides)
        if seen.found is None:
            return
        self._signature = seen.signature
        self._next_full = now + timedelta(seconds=_FULL_REFRESH)
        changes = self.catalog.apply(
            seen.found, now, lambda keys: schedule_records.last_ticks(keys, using=self.using)
        )
        if changes.flagged:
            self._flag(changes.flagged, now, term)
        notes = self.catalog.notes(
            changes,
            schedule_records.problems(using=self.using),
            recorded=schedule_records.record_keys(using=self.using) if first else (),
        )
        if notes:
            schedule_records.note_problems(
                notes, term=term, using=self.using, ttl=self.settings.lease_ttl
            )

    def _open_runs(self, now: datetime) -> None:
        since = now - timedelta(seconds=self.settings.overlap_timeout)
        for task_id, key, created in ledger.open_runs(since=since, using=self.using):
            entry = self.catalog.entries.get(key)
            if entry is not None:
                entry.open_run, entry.open_since = task_id, created

    def _flag(self, schedules: list[Schedule], now: datetime, term: Term) -> None:
        """Record why these schedules cannot run (one ERROR line each, unless the traceback
        was already logged)."""
        for schedule in schedules:
            if schedule.key not in self.catalog.logged:
                logger.error("schedule %s cannot run: %s", schedule.key, schedule.problem)
            metrics.SCHEDULE_ERRORS.labels(metrics.schedule_label(schedule.key)).inc()
        schedule_records.flag(
            {s.key: s.problem for s in schedules},
            at=now,
            term=term,
            using=self.using,
            ttl=self.settings.lease_ttl,
        )
