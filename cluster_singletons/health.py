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


def cluster_health(
    *, now: datetime | None = None, detail: bool = True, settings: ClusterSettings | None = None
) -> Report:
    """The health of every singleton, cron function and the beat, as of ``now`` (default:
    the database's clock). Raises ``DatabaseError`` when the database is unreachable."""
    from cluster_singletons import schedules, singletons

    settings = settings or get_settings()
    db = settings.database
    now = now or _database_now(db)
    prefix = settings.key_prefix
    leases = {lease.name: lease for lease in Lease.objects.using(db).all()}
    beats = {hb.name: hb for hb in Heartbeat.objects.using(db).all()}

    def item(name: str, lease_name: str, kind: str, interval: float, overdue: Any = None) -> Item:
        lease = leases.get(prefix + lease_name)
        beat = beats.get(name)
        led = lease is not None and lease.holder_id and lease.expires_at and lease.expires_at > now
        base: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "expected_interval": interval,
            "executions": beat.executions if beat else 0,
            "failures": beat.failures if beat else 0,
            "last_error": beat.last_error if beat else "",
        }
        if beat is not None and beat.beat_at is not None:
            base["age"] = round((now - beat.beat_at).total_seconds(), 3)
        if not led:
            return Item(status=NOT_LED, **base)
        assert lease is not None and lease.acquired_at is not None
        base.update(leader=lease.holder_id, epoch=lease.epoch)
        grace_end = lease.acquired_at + timedelta(seconds=settings.stale_grace)
        if (
            beat is not None
            and beat.failed_at
            and (not beat.beat_at or beat.failed_at > beat.beat_at)
        ):
            return Item(status=FAILED, **base)
        if beat is None or beat.beat_at is None:
            return Item(status=NEVER if now <= grace_end else STALE, **base)
        if overdue is not None:
            late = overdue(beat.beat_at)
            stale = late is not None and now > max(late, grace_end)
        else:
            limit = timedelta(seconds=settings.stale_threshold * interval)
            stale = now > max(beat.beat_at + limit, grace_end)
        return Item(status=STALE if stale else HEALTHY, **base)

    items = [
        item(BEAT, BEAT, "beat", settings.beat_refresh_interval)
        if BEAT in beats or prefix + BEAT in leases
        else None
    ]
    for spec in singletons.registered().values():
        items.append(item(spec.lease, spec.lease, "singleton", spec.interval))
    for cron in schedules.crons():
        assert cron.timetable is not None
        timetable = cron.timetable

        def overdue(last: datetime, timetable: Any = timetable) -> datetime | None:
            due = timetable.next_after(last)
            return None if due is None else due + timedelta(seconds=settings.stale_grace)

        items.append(item(cron.key, BEAT, "cron", 0.0, overdue))
    found = [i for i in items if i is not None]
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
    from cluster_singletons.leases import now_sql

    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {now_sql(connection)}", [])  # params: %% becomes %
        value: datetime | str = cursor.fetchone()[0]
    if isinstance(value, str):  # SQLite returns text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
