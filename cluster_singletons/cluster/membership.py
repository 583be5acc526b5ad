"""The runner registry: one row per live process taking part in the cluster.

Invariants:

- ``last_seen`` is the database's clock at the runner's last sign of life.
- A registration is only deleted by its own runner (clean exit) or, once it has not been
  seen for ``runner_forget_after``, by any runner; a deleted registration releases nothing
  by itself (its leases expire or are taken over as usual).
- No write here is fenced: each touches only the writer's own registration (``touch``,
  ``mark_stopping``, ``set_crash_detection``, ``deregister``) or registrations long dead
  (``forget_stale``), and none decides who leads: leases do.

``live_view``, ``counts`` and ``rows`` are reads.
"""

from __future__ import annotations

import datetime as dt
from datetime import datetime

from django.db.models import BooleanField, Count, Q
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

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


def touch(runner_id: int, *, using: str) -> bool:
    """Record a sign of life; False if the registration no longer exists."""
    return bool(Runner.objects.using(using).filter(pk=runner_id).update(last_seen=Now()))


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
    """Live runners (seen within ``ttl``, not stopping, not known dead) and how many
    unexpired leases named ``lease_prefix…`` each holds."""
    fresh = Runner.objects.using(using).filter(
        last_seen__gt=Now() - dt.timedelta(seconds=ttl), stopping=False
    )
    if crash_detection:
        fresh = fresh.exclude(runner_is_gone(f'"{Runner._meta.db_table}"'))
    counted = fresh.annotate(
        held=Count(
            "leases",
            filter=Q(leases__name__startswith=lease_prefix, leases__expires_at__gt=Now()),
        )
    )
    return dict(counted.values_list("id", "held"))


def counts(*, seen_within: float, now: datetime, using: str) -> tuple[int, int]:
    """Registrations seen within ``seen_within`` seconds of ``now``, and of those the ones
    not stopping (a read)."""
    live = Runner.objects.using(using).filter(last_seen__gt=now - dt.timedelta(seconds=seen_within))
    return live.count(), live.filter(stopping=False).count()


def rows(*, using: str) -> list[Runner]:
    """Every registration, oldest first (a read, for reports)."""
    return list(Runner.objects.using(using).order_by("id"))
