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

import copy
import gc
import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from django.db import connections

from cluster_singletons import metrics, names
from cluster_singletons._connection import DATABASE_ERRORS, drop_if_unusable
from cluster_singletons.beat import (
    deliveries,
    ledger,
    outbox,
    periodic_tasks,
    planning,
    refresh,
    schedule_records,
)
from cluster_singletons.beat.catalog import Catalog, Changes
from cluster_singletons.beat.loaded import Loaded
from cluster_singletons.beat.planning import Entry
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.cluster import heartbeats
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import describe
from cluster_singletons.models import Run
from cluster_singletons.pacing import Backoff

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


class BeatEngine:
    """Schedules, the heap of due times, and the ledger writes of one leader term."""

    def __init__(
        self,
        app: Any,
        *,
        settings: ClusterSettings | None = None,
        clock: Clock | None = None,
        loaded: Loaded | None = None,
    ) -> None:
        """``loaded``: the schedules a warm standby kept current (None: load them)."""
        self.app = app
        self.settings = settings or get_settings()
        self.clock: Clock = clock or SystemClock()
        self.using = self.settings.database
        self.loaded = loaded or Loaded(
            app, using=self.using, overlap_timeout=self.settings.overlap_timeout
        )
        self._policy = planning.Policy(
            skip_if_older_than=self.settings.skip_if_older_than, overlap=self.settings.overlap
        )
        self._lookahead = timedelta(seconds=self.settings.beat_lookahead)
        #: When the schedules' records are brought up to date (after the first pass).
        self._settle_at: datetime | None = None
        self._watcher: refresh.Watcher | None = None
        self._next_refresh = self._next_full = self._next_pending = self.clock.now()
        self._deliveries = deliveries.Upcoming(
            self._next_refresh, poll=_DELIVERY_POLL, using=self.using, limit=_MAX_BATCH
        )
        self._next_heartbeat = self.clock.now()
        self._digested = connections[self.using].vendor == "postgresql"
        self._outbox = outbox.Outbox(
            app, using=self.using, clock=self.clock, after_publish=self._after_publish
        )

    @property
    def catalog(self) -> Catalog:
        return self.loaded.catalog

    # -- hosting -----------------------------------------------------------------------

    def run(self, leadership: Leadership) -> None:
        """Leader work for the ``beat`` lease: load (unless warm), then step until the term
        ends. A pass that fails on the database is retried in place, schedules kept."""
        warm = self.start(leadership)
        if not warm:
            # What was just loaded lives as long as the term: keep the collector from
            # walking it (a full collection over 100k schedules stalls dispatch ~0.3 s).
            gc.collect()
            gc.freeze()
        self._watcher = refresh.Watcher(
            self.loaded.look,
            interval=self.settings.beat_refresh_interval,
            using=self.using,
            # Off PostgreSQL the signature misses bulk update()s: reread everything too.
            full_every=None if self._digested else _FULL_REFRESH,
            backoff_max=self.settings.retry_backoff_max,
        )
        self._watcher.start()
        try:
            self._loop(leadership)
        finally:
            self._watcher.stop()
            self._watcher = None
            self._outbox.close()
            if not warm:
                gc.unfreeze()

    def _loop(self, leadership: Leadership) -> None:
        window = timedelta(seconds=self.settings.beat_batch_window)
        backoff = Backoff.from_settings(self.settings)
        while leadership.running:
            started = self.clock.now()
            try:
                wake = max(self.step(leadership), started + window)
            except DATABASE_ERRORS as exc:
                # The term goes on (the coordinator ends it if renewals fail too); the
                # schedules stay loaded and the failed pass is planned again.
                drop_if_unusable(self.using)
                if not backoff.failures:
                    logger.warning(
                        "beat pass failed: database error (%s); retrying, schedules kept",
                        describe(exc),
                    )
                leadership.sleep(backoff.delay)
                backoff = backoff.failed()
                continue
            if backoff.failures:
                logger.info("beat passes work again after %d failed", backoff.failures)
                backoff = backoff.reset()
            delay = (wake - self.clock.now()).total_seconds()
            if delay > 0:
                leadership.sleep(delay)

    def start(self, leadership: Leadership) -> bool:
        """Load the schedules, or bring a warm standby's up to the ledger; take over what a
        previous leader recorded and did not publish. Returns whether it was warm."""
        now = self.clock.now()
        self._outbox.clear()
        warm = self.loaded.loaded
        seen = self.loaded.resume(now)
        if seen is not None:  # an edit seen only now: from where the last leader had got
            self._apply(seen, self.loaded.followed_to or now, leadership.term)
        self._policy = replace(self._policy, overrides=self.loaded.overrides)
        self._settle_at = now
        # Including ticks the previous leader recorded ahead: those go out when due.
        self._republish(now, leadership, ahead=self._lookahead)
        logger.info(
            "beat leader (epoch %s, %s): %d schedules, next due %s",
            leadership.term.epoch,
            "warm" if warm else "loaded",
            len(self.catalog),
            due.isoformat() if (due := self.catalog.next_due) else "never",
        )
        return warm

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
        if now >= self._deliveries.next_at:
            self._deliver(now, leadership)
        if now >= self._next_heartbeat:
            self._heartbeat(now, leadership.term)
        if self._settle_at is not None and now >= self._settle_at:
            self._settle(now, leadership.term)
        wake = [self._next_refresh, self._next_pending, self._deliveries.next_at]
        if (first := self.catalog.next_due) is not None:
            wake.append(first - self._lookahead)
        if (waiting := self.catalog.next_waiting) is not None:
            wake.append(waiting)
        if self._outbox.next_at is not None:
            wake.append(self._outbox.next_at)
        return min(wake)

    def _heartbeat(self, now: datetime, term: Term) -> None:
        """The beat's own freshness: a leader whose loop hangs stops writing this, and one
        whose watcher cannot look for edits writes why (the beat's health turns red)."""
        self._next_heartbeat = now + timedelta(seconds=_HEARTBEAT_EVERY)
        heartbeats.record(
            names.BEAT,
            runner_id=term.runner_id,
            epoch=term.epoch,
            interval=self.settings.beat_refresh_interval,
            error=self._watcher.problem() if self._watcher else None,
            using=self.using,
        )

    # -- planning ----------------------------------------------------------------------

    def _dispatch_due(self, due: list[Entry], now: datetime, leadership: Leadership) -> None:
        before_pass = [(entry, copy.copy(entry)) for entry in due]
        try:
            self._plan(due, now, leadership)
        except Exception:  # the cursors as they were: planned again (recorded ticks once)
            for entry, before in before_pass:
                vars(entry).update(vars(before))
                self.catalog.push(entry)
            raise

    def _plan(self, due: list[Entry], now: datetime, leadership: Leadership) -> None:
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
            paused = entry.schedule.key in self.loaded.paused
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
        periodic_tasks.after_publish(runs, self.catalog.schedules, self.clock.now(), self.using)

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
        ready = self._deliveries.take_due(now)
        if ready:
            rows = deliveries.claim(
                ready, term=leadership.term, using=self.using, ttl=self.settings.lease_ttl
            )
            self._enqueue(rows, now, leadership)

    # -- loading -----------------------------------------------------------------------

    def _refresh(self, now: datetime, term: Term) -> None:
        """Apply what the refresh thread saw; without one (a test's clock), look now."""
        interval = self.settings.beat_refresh_interval
        if self._watcher is not None:
            # It looks every interval; what it saw is taken within a fraction of one.
            self._next_refresh = now + timedelta(seconds=min(interval, _TAKE_EVERY))
            seen = self._watcher.take()
        else:
            self._next_refresh = now + timedelta(seconds=interval)
            seen = self.loaded.look(full=now >= self._next_full and not self._digested)
        if seen is not None:
            self._apply(seen, now, term)

    def _apply(self, seen: refresh.Seen, now: datetime, term: Term) -> None:
        changes = self.loaded.apply(seen, now)
        self._policy = replace(self._policy, overrides=self.loaded.overrides)
        if changes is None:
            return
        self._next_full = now + timedelta(seconds=_FULL_REFRESH)
        if changes.flagged:
            self._flag(changes.flagged, now, term)
        self._note(changes, term)

    def _settle(self, now: datetime, term: Term) -> None:
        """A new term's first look at the schedules' records, after its first pass: each
        schedule that cannot run is flagged, records of schedules fixed or gone say so."""
        self._settle_at = None
        broken = [s for s in self.catalog.schedules.values() if s.problem]
        if broken:
            self._flag(broken, now, term)
        self._note(Changes(), term, recorded=schedule_records.record_keys(using=self.using))

    def _note(self, changes: Changes, term: Term, *, recorded: Iterable[str] = ()) -> None:
        problems = schedule_records.problems(using=self.using)
        notes = self.catalog.notes(changes, problems, recorded=recorded)
        if notes:
            schedule_records.note_problems(
                notes, term=term, using=self.using, ttl=self.settings.lease_ttl
            )

    def _flag(self, schedules: list[Schedule], now: datetime, term: Term) -> None:
        schedule_records.flag(
            schedules,
            logged=self.catalog.logged,
            at=now,
            term=term,
            using=self.using,
            ttl=self.settings.lease_ttl,
        )
