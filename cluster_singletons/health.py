"""Heartbeats and health: is every singleton, ``@cron`` function and the beat making progress?

Statuses, per name (``singleton:<name>``, ``cron:<name>``, ``beat``):

- ``not_led``: no runner holds its lease (the beat's lease for ``@cron`` functions).
- ``never_executed``: led, but no execution recorded yet; fine during ``stale_grace``
  after the leader started, ``stale`` after.
- ``failed``: its last execution raised; ``last_error`` says what.
- ``stale``: no execution within ``stale_threshold`` x its expected interval (a cron
  function: its next run overdue by more than ``stale_grace``). For the beat, whose
  engine beats at least every ``beat_refresh_interval``, this is how a beat that hangs
  while its process lives turns the health red.
- ``healthy``.

Time is the database's: heartbeats are written with its clock and ages computed against it
(or against an injected ``now`` in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import IntegrityError, connections, transaction
from django.db.models import F
from django.db.models.functions import Now

from cluster_singletons import metrics
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.models import Delivery, Heartbeat, Lease, Run, Runner

HEALTHY, STALE, NEVER, FAILED, NOT_LED = "healthy", "stale", "never_executed", "failed", "not_led"
UNHEALTHY = frozenset({STALE, FAILED, NOT_LED})
BEAT = "beat"


def record(
    name: str,
    *,
    runner_id: int,
    epoch: int,
    interval: float,
    error: str | None = None,
    duration: float | None = None,
    using: str | None = None,
) -> None:
    """Record an execution of ``name`` (``error``: it failed) in the table and the metrics."""
    db = using or get_settings().database
    label = name.partition(":")[2] or name
    if error is None:
        changes: dict[str, Any] = {"beat_at": Now(), "executions": F("executions") + 1}
        metrics.EXECUTIONS.labels(label).inc()
        metrics.LAST_EXECUTION.labels(label).set_to_current_time()
    else:
        changes = {"failed_at": Now(), "failures": F("failures") + 1, "last_error": error}
    if duration is not None:
        metrics.EXECUTION_SECONDS.labels(label).observe(duration)
    fields = {"runner_id": runner_id, "epoch": epoch, "expected_interval": interval, **changes}
    rows = Heartbeat.objects.using(db).filter(name=name)
    if rows.update(**fields):
        return
    try:
        with transaction.atomic(using=db):
            Heartbeat.objects.using(db).create(
                name=name,
                runner_id=runner_id,
                epoch=epoch,
                expected_interval=interval,
                beat_at=Now() if error is None else None,
                executions=1 if error is None else 0,
                failures=0 if error is None else 1,
                last_error=error or "",
                failed_at=Now() if error is not None else None,
            )
    except IntegrityError:  # created meanwhile by another process: update that row
        rows.update(**fields)


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

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass(frozen=True, kw_only=True)
class Report:
    healthy: bool
    runners: int
    runners_healthy: int
    led: int
    pending_intents: int
    pending_deliveries: int
    items: list[Item] = field(default_factory=list)

    def as_dict(self, *, detail: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.healthy else "unhealthy"}
        if detail:
            out.update(
                runners=self.runners,
                runners_healthy=self.runners_healthy,
                singletons_led=self.led,
                pending_intents=self.pending_intents,
                pending_deliveries=self.pending_deliveries,
                checks=[item.as_dict() for item in self.items],
            )
        return out


#: When a heartbeat at the given time goes stale (``None``: never).
Deadline = Callable[[datetime], datetime | None]


def status(
    lease: Lease | None,
    beat: Heartbeat | None,
    now: datetime,
    *,
    grace: timedelta,
    deadline: Deadline,
) -> str:
    """The status of one name from its lease and heartbeat at ``now`` (a pure function)."""
    if lease is None or lease.holder_id is None or not lease.expires_at or lease.expires_at <= now:
        return NOT_LED
    assert lease.acquired_at is not None
    grace_end = lease.acquired_at + grace
    if beat is not None and beat.failed_at and (not beat.beat_at or beat.failed_at > beat.beat_at):
        return FAILED
    if beat is None or beat.beat_at is None:
        return NEVER if now <= grace_end else STALE
    stale_at = deadline(beat.beat_at)
    return STALE if stale_at is not None and now > max(stale_at, grace_end) else HEALTHY


def cluster_health(
    *, now: datetime | None = None, detail: bool = True, settings: ClusterSettings | None = None
) -> Report:
    """The health of every singleton, cron function and the beat, as of ``now`` (default:
    the database's clock). Raises ``DatabaseError`` when the database is unreachable."""
    from cluster_singletons.beat import sources
    from cluster_singletons.singletons import registry

    settings = settings or get_settings()
    db = settings.database
    now = now or _database_now(db)
    prefix = settings.key_prefix
    leases = {lease.name: lease for lease in Lease.objects.using(db).all()}
    beats = {hb.name: hb for hb in Heartbeat.objects.using(db).all()}

    grace = timedelta(seconds=settings.stale_grace)

    def item(name: str, lease_name: str, kind: str, interval: float, deadline: Deadline) -> Item:
        lease = leases.get(prefix + lease_name)
        beat = beats.get(name)
        base: dict[str, Any] = {"name": name, "kind": kind, "expected_interval": interval}
        if beat is not None:
            base.update(
                executions=beat.executions, failures=beat.failures, last_error=beat.last_error
            )
            if beat.beat_at is not None:
                base["age"] = round((now - beat.beat_at).total_seconds(), 3)
        state = status(lease, beat, now, grace=grace, deadline=deadline)
        if state != NOT_LED:
            assert lease is not None
            base.update(leader=lease.holder_id, epoch=lease.epoch)
        return Item(status=state, **base)

    def every(interval: float) -> Deadline:
        limit = timedelta(seconds=settings.stale_threshold * interval)
        return lambda last: last + limit

    found = []
    if BEAT in beats or prefix + BEAT in leases:
        interval = settings.beat_refresh_interval
        found.append(item(BEAT, BEAT, "beat", interval, every(interval)))
    for spec in registry.registered().values():
        found.append(item(spec.lease, spec.lease, "singleton", spec.interval, every(spec.interval)))
    for cron in sources.crons():
        assert cron.timetable is not None
        timetable = cron.timetable

        def next_run(last: datetime, timetable: Any = timetable) -> datetime | None:
            due = timetable.next_after(last)
            return None if due is None else due + grace

        found.append(item(cron.key, BEAT, "cron", 0.0, next_run))
    live = Runner.objects.using(db).filter(
        last_seen__gt=now - timedelta(seconds=settings.lease_ttl)
    )
    runners = live.count()
    healthy_runners = live.filter(stopping=False).count()
    return Report(
        healthy=healthy_runners > 0 and not any(i.status in UNHEALTHY for i in found),
        runners=runners,
        runners_healthy=healthy_runners,
        led=sum(1 for i in found if i.kind == "singleton" and i.status != NOT_LED),
        pending_intents=Run.objects.using(db).filter(status=Run.Status.PENDING).count(),
        pending_deliveries=Delivery.objects.using(db)
        .filter(status=Delivery.Status.PENDING)
        .count(),
        items=found if detail else [],
    )


def _database_now(using: str) -> datetime:
    from cluster_singletons.cluster.leases import now_sql

    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {now_sql(connection)}", [])  # params: %% becomes %
        value: datetime | str = cursor.fetchone()[0]
    if isinstance(value, str):  # SQLite returns text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
