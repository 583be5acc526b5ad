"""The cluster's health report: is every singleton, ``@cron`` function and the beat making
progress, can every schedule run, and how many runners are alive?

``cluster_health`` reads the leases, heartbeats, the beat's schedule records and runner
registrations through their stores and judges each name with ``status.status``; a
schedule the beat flagged (``ScheduleRecord.problem``) is ``invalid``. Time is the
database's: heartbeats are written with its clock and ages computed against it (or
against an injected ``now`` in tests). The probes, ``cluster_status``, the admin
dashboard and the scrape-time metrics (``collector``) all show this one report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cluster_singletons import names
from cluster_singletons.beat import catalog, crons, deliveries, ledger, schedule_records
from cluster_singletons.cluster import fencing, heartbeats, leases, membership
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import describe
from cluster_singletons.health.status import (
    FAILED,
    GONE,
    INVALID,
    LIVE,
    NOT_LED,
    UNHEALTHY,
    Deadline,
    runner_state,
    status,
)
from cluster_singletons.models import Runner
from cluster_singletons.singletons import registry

logger = logging.getLogger("cluster_singletons.health")

#: What keeps a schedule from running, as the beat words it (``sources``, ``engine``): the
#: ``kind`` label of ``cluster_beat_schedule_problems``; anything else is ``invalid``. (A
#: key too long to store has no record: the beat only logs it.)
PROBLEM_KINDS = {
    "unknown task ": "unknown_task",
    "its ticks cannot be planned": "unplannable",
}
INVALID_KIND = "invalid"
KINDS = (*PROBLEM_KINDS.values(), INVALID_KIND)


def problem_kind(problem: str) -> str:
    """The kind of a schedule's problem text (``invalid``: a bad expression, zone, value)."""
    return next(
        (k for start, k in PROBLEM_KINDS.items() if problem.startswith(start)), INVALID_KIND
    )


@dataclass(frozen=True, kw_only=True)
class Item:
    """The health of one singleton, cron function or the beat."""

    name: str
    kind: str
    status: str
    leader: int | None = None
    epoch: int | None = None
    age: float | None = None
    expected_interval: float | None = None
    executions: int = 0
    failures: int = 0
    last_error: str = ""
    #: A schedule's kind of problem (``problem_kind``).
    problem: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass(frozen=True, kw_only=True)
class RunnerStatus:
    """One registration as the report shows it: ``state`` is ``live``, ``stopping`` or
    ``gone`` (``status.runner_state``), ``seen_ago`` seconds by the database's clock."""

    id: int
    host: str
    pid: int
    kind: str
    started_at: datetime
    last_seen: datetime
    seen_ago: float
    state: str
    stopping: bool
    crash_detection: str
    clock_offset: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class Report:
    healthy: bool
    #: Registrations not gone (live or stopping), and of those the live ones.
    runners: int
    runners_healthy: int
    runners_gone: int
    led: int
    pending_intents: int
    pending_deliveries: int
    items: list[Item] = field(default_factory=list)
    #: Schedules the beat cannot run, by kind of problem (``KINDS``; none: absent).
    schedule_problems: dict[str, int] = field(default_factory=dict)
    #: Live runner id -> its estimate of the database's clock minus its wall clock (s).
    clock_offsets: dict[int, float] = field(default_factory=dict)
    #: Every registration, oldest first, with its state (empty without ``detail``).
    runner_list: list[RunnerStatus] = field(default_factory=list)

    @property
    def runners_stopping(self) -> int:
        return self.runners - self.runners_healthy

    def as_dict(self, *, detail: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.healthy else "unhealthy"}
        if detail:
            out.update(
                runners=self.runners,
                runners_healthy=self.runners_healthy,
                runners_gone=self.runners_gone,
                singletons_led=self.led,
                pending_intents=self.pending_intents,
                pending_deliveries=self.pending_deliveries,
                checks=[item.as_dict() for item in self.items],
                schedule_problems=self.schedule_problems,
                clock_offsets={str(k): round(v, 6) for k, v in self.clock_offsets.items()},
            )
        return out


def cluster_health(
    *, now: datetime | None = None, detail: bool = True, settings: ClusterSettings | None = None
) -> Report:
    """The health of every singleton, cron function and the beat, as of ``now`` (default:
    the database's clock). Raises ``DatabaseError`` when the database is unreachable."""
    settings = settings or get_settings()
    db = settings.database
    now = now or fencing.database_now(db)
    prefix = settings.key_prefix
    held = leases.by_name(using=db)
    beats = heartbeats.by_name(using=db)
    grace = timedelta(seconds=settings.stale_grace)

    def item(
        name: str,
        lease_name: str,
        kind: str,
        interval: float,
        deadline: Deadline,
        first: Deadline | None = None,
    ) -> Item:
        lease = held.get(names.prefixed(lease_name, prefix))
        beat = beats.get(name)
        base: dict[str, Any] = {"name": name, "kind": kind, "expected_interval": interval}
        if beat is not None:
            base.update(
                executions=beat.executions, failures=beat.failures, last_error=beat.last_error
            )
            if beat.beat_at is not None:
                base["age"] = round((now - beat.beat_at).total_seconds(), 3)
        try:
            state = status(lease, beat, now, grace=grace, deadline=deadline, first=first)
        except Exception as exc:  # this item only: reported, never an error page
            logger.exception("the health of %s cannot be computed", name)
            state, base["last_error"] = FAILED, f"its health cannot be computed: {describe(exc)}"
        if state != NOT_LED and lease is not None and lease.holder_id is not None:
            base.update(leader=lease.holder_id, epoch=lease.epoch)
        return Item(status=state, **base)

    def every(interval: float) -> Deadline:
        limit = timedelta(seconds=settings.stale_threshold * interval)
        return lambda last: last + limit

    found = []
    if names.BEAT in beats or names.prefixed(names.BEAT, prefix) in held:
        interval = settings.beat_refresh_interval
        found.append(item(names.BEAT, names.BEAT, "beat", interval, every(interval)))
    for spec in registry.registered().values():
        found.append(item(spec.lease, spec.lease, "singleton", spec.interval, every(spec.interval)))
    for cron in crons.registered():
        assert cron.timetable is not None
        timetable = cron.timetable

        def next_run(last: datetime, timetable: Any = timetable) -> datetime | None:
            due = timetable.next_after(last)
            return None if due is None else due + grace

        # Never run yet: stale only once its first run after the beat's leader started is
        # overdue (a nightly job is not due all day).
        found.append(item(cron.key, names.BEAT, "cron", 0.0, next_run, first=next_run))
    problems: dict[str, int] = {}
    flagged = schedule_records.problems(using=db, excluding=[catalog.DELETED])
    for key, problem in sorted(flagged.items()):
        kind = problem_kind(problem)
        problems[kind] = problems.get(kind, 0) + 1
        found.append(
            Item(name=key, kind="schedule", status=INVALID, last_error=problem, problem=kind)
        )
    runner_list = _runners(now, settings)
    states = [r.state for r in runner_list]
    return Report(
        healthy=LIVE in states and not any(i.status in UNHEALTHY for i in found),
        runners=len(states) - states.count(GONE),
        runners_healthy=states.count(LIVE),
        runners_gone=states.count(GONE),
        led=sum(1 for i in found if i.kind == "singleton" and i.status != NOT_LED),
        pending_intents=ledger.pending_count(using=db),
        pending_deliveries=deliveries.pending_count(using=db),
        items=found if detail else [],
        schedule_problems=problems,
        clock_offsets={
            r.id: r.clock_offset
            for r in runner_list
            if r.state != GONE and r.clock_offset is not None
        }
        if detail
        else {},
        runner_list=runner_list if detail else [],
    )


#: What a ``RunnerStatus`` shows of its registration as it is.
_COPIED = (
    "id",
    "host",
    "pid",
    "kind",
    "started_at",
    "last_seen",
    "stopping",
    "crash_detection",
    "clock_offset",
)


def _runners(now: datetime, settings: ClusterSettings) -> list[RunnerStatus]:
    return [runner_status(row, now, settings) for row in membership.rows(using=settings.database)]


def runner_status(row: Runner, now: datetime, settings: ClusterSettings) -> RunnerStatus:
    """A registration read by ``membership.rows`` as of ``now`` (the database's clock)."""
    state = runner_state(
        last_seen=row.last_seen,
        stopping=row.stopping,
        session_gone=row.session_gone,  # type: ignore[attr-defined]
        now=now,
        ttl=settings.lease_ttl,
    )
    seen_ago = round((now - row.last_seen).total_seconds(), 3)
    copied: dict[str, Any] = {name: getattr(row, name) for name in _COPIED}
    return RunnerStatus(**copied, seen_ago=seen_ago, state=state)
