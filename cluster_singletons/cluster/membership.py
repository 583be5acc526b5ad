"""The runner registry: one row per live process taking part in the cluster.

Invariants:

- ``last_seen`` is the database's clock at the runner's last sign of life; ``touch``
  returns it, which is how each runner learns the database's clock (``database_clock``).
- ``clock_offset`` is the runner's own estimate (the database's clock minus its wall
  clock), written with each sign of life: as of its previous one.
- A registration is only deleted by its own runner (clean exit) or, once it has not been
  seen for ``runner_forget_after``, by any runner; a deleted registration releases nothing
  by itself (its leases expire or are taken over as usual).
- No write here is fenced: each touches only the writer's own registration (``touch``,
  ``mark_stopping``, ``set_crash_detection``, ``deregister``) or registrations long dead
  (``forget_stale``), and none decides who leads: leases do.

``live_view``, ``counts``, ``clock_offsets`` and ``rows`` are reads.
"""

from __future__ import annotations

import datetime as dt
from datetime import datetime

from django.db import connections
from django.db.models import BooleanField, Count, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

from cluster_singletons.cluster.fencing import database_now, database_time, now_sql
from cluster_singletons.models import Runner

#: Advisory-lock namespace (first key of ``pg_advisory_lock(int, int)``): "CSRL".
LIVENESS_LOCK_NAMESPACE = 0x4353524C & 0x7FFFFFFF
HOW_MAX = Runner._meta.get_field("crash_detection").max_length or 300


def runner_is_gone(runner: str) -> RawSQL:
    """PostgreSQL: true when runner row alias ``runner`` registered a liveness lock that no
    session holds any more, i.e. its process or connection died. Only the runner's own
    (exclusive) lock counts: standbys watching it take it shared for an instant."""
    return RawSQL(
        f"""({runner}.liveness_lock AND NOT EXISTS (
                SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                  AND l.mode = 'ExclusiveLock'
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = %s::oid AND l.objid = {runner}.id::oid))""",
        (LIVENESS_LOCK_NAMESPACE,),
        output_field=BooleanField(),
    )


def register(*, host: str, pid: int, kind: str, using: str) -> int:
    """Insert a registration and return its id (unique for the life of the table)."""
    return Runner.objects.using(using).create(host=host, pid=pid, kind=kind).pk


#: Backends whose UPDATE returns what it wrote (``RETURNING``): one statement per touch.
RETURNING = frozenset({"postgresql", "sqlite"})


def touch(runner_id: int, *, using: str, clock_offset: float | None = None) -> datetime | None:
    """Record a sign of life (and the runner's estimated ``clock_offset``); return the
    database's clock that ``last_seen`` was set to, or None if the registration no longer
    exists.

    - One ``UPDATE ... RETURNING`` where the backend has it (``RETURNING``); elsewhere the
      update, then a read of the database's clock.
    - The clock is the ORM's ``Now()``, the one lease expiry is compared with; on
      PostgreSQL ``statement_timestamp()``, read as the statement arrives, so always
      between its send and its answer. (``now()`` is the transaction's start: in
      autocommit the same, inside a longer transaction earlier than the send.)
    """
    connection = connections[using]
    if connection.vendor not in RETURNING:
        found = Runner.objects.using(using).filter(pk=runner_id)
        if not found.update(last_seen=Now(), clock_offset=clock_offset):
            return None
        return database_now(using)
    q = connection.ops.quote_name
    sql = (
        f"UPDATE {q(Runner._meta.db_table)} SET {q('last_seen')} = {now_sql(connection)}, "
        f"{q('clock_offset')} = %s WHERE {q('id')} = %s RETURNING {q('last_seen')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [clock_offset, runner_id])
        row = cursor.fetchone()
    return None if row is None else database_time(row[0])


def set_crash_detection(runner_id: int, *, lock: bool, how: str, using: str) -> None:
    """Record whether this runner holds its PostgreSQL liveness lock, and how its crash is
    detected (``"session"``, or ``"expiry: "`` and why)."""
    Runner.objects.using(using).filter(pk=runner_id).update(
        liveness_lock=lock, crash_detection=how[:HOW_MAX]
    )


def mark_stopping(runner_id: int, *, using: str) -> None:
    Runner.objects.using(using).filter(pk=runner_id).update(stopping=True, last_seen=Now())


def deregister(runner_id: int, *, using: str) -> None:
    Runner.objects.using(using).filter(pk=runner_id).delete()


def forget_stale(*, older_than: float, using: str) -> int:
    """Delete registrations not seen for ``older_than`` seconds; return how many."""
    cutoff = Now() - dt.timedelta(seconds=older_than)
    deleted, _ = Runner.objects.using(using).filter(last_seen__lt=cutoff).delete()
    return deleted


def live_view(
    *, ttl: float, lease_prefix: str, crash_detection: bool, using: str
) -> dict[int, int]:
    """Live runners (seen within ``ttl``, not stopping, not known dead, not task key
    holders) and how many unexpired leases named ``lease_prefix…`` each holds."""
    fresh = Runner.objects.using(using).filter(
        last_seen__gt=Now() - dt.timedelta(seconds=ttl), stopping=False
    )
    # A process holding task keys never leads singletons: placement must not count it.
    fresh = fresh.exclude(kind=Runner.Kind.TASK)
    if crash_detection:
        fresh = fresh.exclude(runner_is_gone(f'"{Runner._meta.db_table}"'))
    counted = fresh.annotate(
        held=Count(
            "leases",
            filter=Q(leases__name__startswith=lease_prefix, leases__expires_at__gt=Now()),
        )
    )
    return dict(counted.values_list("id", "held"))


def _seen(seen_within: float, now: datetime, using: str) -> QuerySet[Runner]:
    return Runner.objects.using(using).filter(last_seen__gt=now - dt.timedelta(seconds=seen_within))


def counts(*, seen_within: float, now: datetime, using: str) -> tuple[int, int]:
    """Registrations seen within ``seen_within`` seconds of ``now``, and of those the ones
    not stopping (a read)."""
    live = _seen(seen_within, now, using)
    return live.count(), live.filter(stopping=False).count()


def clock_offsets(*, seen_within: float, now: datetime, using: str) -> dict[int, float]:
    """Each registration seen within ``seen_within`` seconds of ``now`` that estimated its
    clock's offset: id -> the database's clock minus its wall clock (a read)."""
    rows = _seen(seen_within, now, using).order_by("id").values_list("id", "clock_offset")
    return {runner: offset for runner, offset in rows if offset is not None}


def rows(*, using: str) -> list[Runner]:
    """Every registration, oldest first (a read, for reports)."""
    return list(Runner.objects.using(using).order_by("id"))
