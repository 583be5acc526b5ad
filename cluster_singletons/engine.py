"""The beat engine: what the leader of the ``beat`` lease runs.

One pass (``step``) at wall-clock time ``now``:

1. every ``beat_refresh_interval``: reread schedules whose source changed (PostgreSQL: a
   server-side digest, so bulk ``update()``s count; SQLite: also a full reread every
   minute); pauses;
2. pop the schedules due by ``now`` from a heap and plan each: missed ticks older than
   ``skip_if_older_than`` become one ``skipped`` row, the newer ones one run (coalesced);
   a run whose predecessor has not finished follows the overlap policy;
3. record the batch in the ledger in one transaction fenced on the beat's term;
4. publish the recorded intents after commit, then mark them published; intents left
   ``pending`` (a crash, the broker down, a manual run) are published again, same task id;
5. dispatch delayed deliveries that are due, through the same ledger.

The cost of a pass grows with the ticks due, not with the number of schedules: the heap
holds each schedule's next due time; nothing scans all schedules except the refresh.
"""

from __future__ import annotations

import heapq
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from django.apps import apps
from django.db import connections
from django.db.models import Count, F, Max
from kombu.exceptions import OperationalError as BrokerError

from cluster_singletons import context, deliveries, health, ledger, metrics, planning, schedules
from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import describe
from cluster_singletons.leadership import Leadership
from cluster_singletons.leases import Term
from cluster_singletons.models import Run, ScheduleRecord
from cluster_singletons.planning import Entry
from cluster_singletons.schedules import Schedule, load_all

logger = logging.getLogger("cluster_singletons.beat")

_FULL_REFRESH = 60.0
_PENDING_POLL = 1.0
_DELIVERY_POLL = 0.5
_MAX_BATCH = 5000
_HEARTBEAT_EVERY = 1.0
#: Published runs are marked in chunks of this many.
_MARK_EVERY = 200
#: A tick published later than this after it was due counts as late.
_LATE = 1.0
_BROKER_ERRORS = (BrokerError, ConnectionError, OSError)
_NEVER = datetime.max.replace(tzinfo=UTC)


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
        self._entries: dict[str, Entry] = {}
        self._policy = planning.Policy(
            skip_if_older_than=self.settings.skip_if_older_than, overlap=self.settings.overlap
        )
        self._heap: list[tuple[datetime, int, str]] = []
        self._seq = 0
        self._paused: set[str] = set()
        self._signature: object = None
        self._next_refresh = self._next_full = self._next_pending = self._next_delivery = (
            self.clock.now()
        )
        self._upcoming: dict[int, datetime] = {}
        self._next_heartbeat = self.clock.now()
        self._executor: ThreadPoolExecutor | None = None

    # -- hosting -----------------------------------------------------------------------

    def run(self, leadership: Leadership) -> None:
        """Leader work for the ``beat`` lease: load, then step until the term ends."""
        self.start(leadership)
        try:
            window = self.settings.beat_batch_window
            while leadership.running:
                started = self.clock.now()
                wake = max(self.step(leadership), started + timedelta(seconds=window))
                delay = (wake - self.clock.now()).total_seconds()
                if delay > 0:
                    leadership.sleep(delay)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def start(self, leadership: Leadership) -> None:
        now = self.clock.now()
        self._entries.clear()
        self._heap.clear()
        self._load(now, full=True, term=leadership.term)
        self._open_runs(now)
        self._republish(leadership)
        logger.info(
            "beat leader (epoch %s): %d schedules, next due %s",
            leadership.term.epoch,
            len(self._entries),
            self._heap[0][0].isoformat() if self._heap else "never",
        )

    # -- one pass ----------------------------------------------------------------------

    def step(self, leadership: Leadership) -> datetime:
        """One pass at the clock's ``now``; returns when the next one is due."""
        now = self.clock.now()
        if now >= self._next_refresh:
            full = now >= self._next_full and connections[self.using].vendor != "postgresql"
            self._load(now, full=full, term=leadership.term)
        due = self._pop_due(now)
        if due:
            self._dispatch_due(due, now, leadership)
        if now >= self._next_pending:
            self._republish(leadership)
        if now >= min(self._next_delivery, self._next_upcoming):
            self._deliver(now, leadership)
        if now >= self._next_heartbeat:
            self._heartbeat(now, leadership.term)
        wake = [self._next_refresh, self._next_pending, self._next_delivery, self._next_upcoming]
        if self._heap:
            wake.append(self._heap[0][0])
        return min(wake)

    @property
    def _next_upcoming(self) -> datetime:
        """When the first delivery already fetched falls due (far future: none)."""
        return min(self._upcoming.values(), default=_NEVER)

    def _heartbeat(self, now: datetime, term: Term) -> None:
        """The beat's own freshness: a leader whose loop hangs stops writing this."""
        self._next_heartbeat = now + timedelta(seconds=_HEARTBEAT_EVERY)
        health.record(
            health.BEAT,
            runner_id=term.runner_id,
            epoch=term.epoch,
            interval=self.settings.beat_refresh_interval,
            using=self.using,
        )

    def _pop_due(self, now: datetime) -> list[Entry]:
        due: list[Entry] = []
        while self._heap and self._heap[0][0] <= now and len(due) < _MAX_BATCH:
            at, _, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is not None and entry.due == at:
                due.append(entry)
        return due

    def _push(self, entry: Entry) -> None:
        if entry.due is not None:
            self._seq += 1
            heapq.heappush(self._heap, (entry.due, self._seq, entry.schedule.key))

    # -- planning ----------------------------------------------------------------------

    def _dispatch_due(self, due: list[Entry], now: datetime, leadership: Leadership) -> None:
        open_ids = [
            e.open_run
            for e in due
            if e.open_run is not None and self._policy.overlap_of(e.schedule) != "allow_all"
        ]
        done = ledger.finished(open_ids, using=self.using) if open_ids else set()
        intents: list[ledger.Intent] = []
        last_ticks: dict[str, datetime] = {}
        for entry in due:
            if entry.open_run is not None and (
                entry.open_run in done
                or (now - (entry.open_since or now)).total_seconds() > self.settings.overlap_timeout
            ):
                entry.open_run = entry.open_since = None
            before = entry.last_tick
            paused = entry.schedule.key in self._paused
            intents.extend(planning.plan(entry, now, paused=paused, policy=self._policy))
            if entry.last_tick is not None and entry.last_tick != before:
                last_ticks[entry.schedule.key] = entry.last_tick
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
            opened = self._entries.get(run.schedule)
            if opened is not None:
                opened.open_run, opened.open_since = run.task_id, now
        for entry in due:
            self._push(entry)
        self._publish(pending, leadership)

    # -- publishing --------------------------------------------------------------------

    def _publish(self, runs: list[Run], leadership: Leadership) -> None:
        """Publish recorded intents while this term is believed; mark the sent ones."""
        if not runs:
            return
        sent: list[Run] = []
        with self.app.producer_or_acquire() as producer:  # one connection for the batch
            for run in runs:
                if not leadership.running:
                    break  # deposed or stopping: the next leader publishes the rest
                if not self._sent(run, leadership.term, producer):
                    break
                sent.append(run)
                if len(sent) >= _MARK_EVERY:  # a crash re-publishes at most this many
                    self._mark(sent)
                    sent = []
        self._mark(sent)

    def _mark(self, runs: list[Run]) -> None:
        if runs:
            ledger.mark_published([r.task_id for r in runs], using=self.using)
            self._after_publish(runs)

    def _sent(self, run: Run, term: Term, producer: Any) -> bool:
        """Publish one run; False (logged, retried later) if the broker refused it."""
        try:
            self._send(run, term, producer)
        except _BROKER_ERRORS as exc:
            logger.warning(
                "publishing %s for %s failed (%s); it stays pending and is retried",
                run.task_id,
                run.schedule,
                describe(exc),
            )
            self._next_pending = self.clock.now() + timedelta(
                seconds=self.settings.retry_backoff_max
            )
            return False
        if run.kind == Run.Kind.SCHEDULED:
            late = (self.clock.now() - run.tick).total_seconds()
            metrics.DISPATCH_LATENESS.observe(late)
            if late > _LATE:
                metrics.TICKS_LATE.labels(metrics.schedule_label(run.schedule)).inc()
        return True

    def _send(self, run: Run, term: Term, producer: Any) -> None:
        fields = {
            "runner": term.runner_id,
            "is_leader": True,
            "epoch": term.epoch,
            "schedule": run.schedule,
            "tick": run.tick.isoformat(),
            "task_id": run.task_id,
        }
        entry = self._entries.get(run.schedule)
        message = ledger.message(run)
        with context.within_cluster(**fields):
            if entry is not None and entry.schedule.fn is not None:
                self._call(entry.schedule, run, term)
                return
            options = dict(message.get("options") or {})
            self.app.send_task(
                run.task,
                args=message.get("args") or (),
                kwargs=message.get("kwargs") or {},
                task_id=run.task_id,
                producer=producer,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
                **options,
            )

    def _call(self, schedule: Schedule, run: Run, term: Term) -> None:
        """Run an in-runner ``@cron`` function in the leader's pool, reporting its end."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cron")
        ctx = context.get()
        fn = schedule.fn
        assert fn is not None

        def call() -> None:
            token = context.activate(ctx)
            status, error = Run.Status.SUCCEEDED, None
            started = time.monotonic()
            try:
                ledger.report(run.task_id, Run.Status.STARTED, using=self.using)
                fn(run)
            except Exception as exc:
                status, error = Run.Status.FAILED, describe(exc)
                metrics.ERRORS.labels(schedule.name, type(exc).__name__).inc()
                logger.exception("cron %s failed for tick %s", schedule.key, run.tick.isoformat())
            finally:
                ledger.report(run.task_id, status, using=self.using)
                health.record(
                    schedule.key,
                    runner_id=term.runner_id,
                    epoch=term.epoch,
                    interval=0.0,
                    error=error,
                    duration=time.monotonic() - started,
                    using=self.using,
                )
                context.deactivate(token)
                connections.close_all()

        self._executor.submit(call)

    def _after_publish(self, runs: list[Run]) -> None:
        """Keep django-celery-beat's bookkeeping true for its admin: last run, run count,
        and one-off tasks disabled once run."""
        names = [r.schedule.partition(":")[2] for r in runs if r.schedule.startswith("periodic:")]
        if not names or not apps.is_installed("django_celery_beat"):
            return
        from django_celery_beat.models import PeriodicTask

        tasks = PeriodicTask.objects.using(self.using).filter(name__in=names)
        tasks.update(last_run_at=self.clock.now(), total_run_count=F("total_run_count") + 1)
        one_off = [
            n for n in names if (e := self._entries.get(f"periodic:{n}")) and e.schedule.one_off
        ]
        if one_off:
            tasks.filter(name__in=one_off).update(enabled=False)

    def _republish(self, leadership: Leadership) -> None:
        """Publish intents left pending: by a crashed leader, a broker outage, a manual run."""
        self._next_pending = self.clock.now() + timedelta(seconds=_PENDING_POLL)
        runs = ledger.pending(using=self.using)
        if runs:
            logger.info("publishing %d pending intent(s) with their recorded task ids", len(runs))
            self._publish(runs, leadership)

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
        self._publish(rows, leadership)

    # -- loading -----------------------------------------------------------------------

    def _load(self, now: datetime, *, full: bool, term: Term) -> None:
        self._next_refresh = now + timedelta(seconds=self.settings.beat_refresh_interval)
        self._paused = set(
            ScheduleRecord.objects.using(self.using)
            .filter(paused=True)
            .values_list("key", flat=True)
        )
        signature = self._source_signature()
        if not full and signature == self._signature:
            return
        self._signature = signature
        self._next_full = now + timedelta(seconds=_FULL_REFRESH)
        found = load_all(
            self.app, using=self.using, previous={k: e.schedule for k, e in self._entries.items()}
        )
        known = self._entries
        new_keys = [k for k in found if k not in known]
        records = self._records(new_keys) if new_keys else {}
        problems = []
        for key in [k for k in known if k not in found]:
            del known[key]
        for key, schedule in found.items():
            entry = known.get(key)
            if entry is not None and (
                entry.schedule is schedule or entry.schedule.fingerprint == schedule.fingerprint
            ):
                continue
            if schedule.problem and (entry is None or entry.schedule.problem != schedule.problem):
                problems.append(schedule)
            last = entry.last_tick if entry is not None else records.get(key)
            # Continue the chain from the ledger; a schedule new to it starts from its own
            # record of its last run, else from when it was last edited, else from now.
            start = last or schedule.last_run_at or schedule.changed_at or now
            if entry is not None:
                start = max(start, now)  # an edit takes effect from now
            updated = Entry(schedule=schedule, last_tick=last)
            if entry is not None:
                updated.open_run, updated.open_since = entry.open_run, entry.open_since
            updated.next_tick = updated.due = schedule.first_tick_after(start)
            known[key] = updated
            self._push(updated)
        if problems:
            self._flag(problems, now, term)

    def _source_signature(self) -> object:
        """Changes when django-celery-beat's schedules change. On PostgreSQL it is a digest
        of every defining column, computed by the server, so bulk ``update()``s are seen
        too and nothing is reread otherwise; elsewhere a cheap summary, completed by the
        full reread every minute."""
        if not apps.is_installed("django_celery_beat"):
            return None
        from django_celery_beat.models import PeriodicTask, PeriodicTasks

        if connections[self.using].vendor == "postgresql":
            with connections[self.using].cursor() as cursor:
                cursor.execute(schedules.periodic_digest_sql())
                return cursor.fetchone()
        stats = PeriodicTask.objects.using(self.using).aggregate(
            n=Count("id"), changed=Max("date_changed")
        )
        last = PeriodicTasks.objects.using(self.using).values_list("last_update", flat=True)
        return stats["n"], stats["changed"], list(last)

    def _records(self, keys: list[str]) -> dict[str, datetime | None]:
        found: dict[str, datetime | None] = {}
        for start in range(0, len(keys), 5000):
            chunk = keys[start : start + 5000]
            found.update(
                ScheduleRecord.objects.using(self.using)
                .filter(key__in=chunk)
                .values_list("key", "last_tick")
            )
        return found

    def _open_runs(self, now: datetime) -> None:
        since = now - timedelta(seconds=self.settings.overlap_timeout)
        rows = (
            Run.objects.using(self.using)
            .filter(created_at__gte=since)
            .exclude(status__in=Run.FINISHED)
            .order_by("id")
            .values_list("task_id", "schedule", "created_at")
        )
        for task_id, key, created in rows:
            entry = self._entries.get(key)
            if entry is not None:
                entry.open_run, entry.open_since = task_id, created

    def _flag(self, schedules: list[Schedule], now: datetime, term: Term) -> None:
        for schedule in schedules:
            logger.error("schedule %s cannot run: %s", schedule.key, schedule.problem)
            metrics.SCHEDULE_ERRORS.labels(metrics.schedule_label(schedule.key)).inc()
        ScheduleRecord.objects.using(self.using).bulk_create(
            [ScheduleRecord(key=s.key, problem=s.problem) for s in schedules],
            update_conflicts=True,
            unique_fields=["key"],
            update_fields=["problem"],
        )
        ledger.record(
            [
                ledger.Intent(schedule=s.key, tick=now, status=Run.Status.ERROR, reason=s.problem)
                for s in schedules
            ],
            last_ticks={},
            term=term,
            using=self.using,
            ttl=self.settings.lease_ttl,
        )
