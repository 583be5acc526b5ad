"""The claim store: one row per task key enqueued with ``singleton_on_enqueue="drop"``,
while its run is queued or running.

Invariants:

- At most one claim per key: the lease name is the primary key. ``claim`` takes a stale
  claim over in one conditional UPDATE, or inserts (``ON CONFLICT DO NOTHING``) and reads
  back who holds it, so of two producers racing for a key one wins and the other gets
  the winner's task id.
- A claim is live while its run is queued (no holder) and was claimed less than
  ``queued_for`` seconds ago by the database's clock, or while its run's holder still
  holds the key's lease, unexpired. Otherwise it is stale (the run died, its message was
  lost, or it ended without a word) and the next ``claim`` takes it over.
- A claim is finished (deleted) only under its own task id: by the run that held it, or
  when its message is revoked.
- No write here is fenced, and none needs to be: a claim is a hint for producers, never
  the guarantee. A duplicate that slips past it is stopped at run time by the key's lease.

``holding`` and ``held`` (the task keys held now, for operators) are reads.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, OuterRef, Q
from django.db.models.functions import Now

from cluster_singletons.models import Lease, TaskClaim


def _stale(queued_for: float) -> Q:
    long_ago = ExpressionWrapper(
        Now() - dt.timedelta(seconds=queued_for), output_field=DateTimeField()
    )
    running = Lease.objects.filter(
        name=OuterRef("lease"), holder_id=OuterRef("holder"), expires_at__gt=Now()
    )
    run_gone = Q(Q(holder__isnull=False), ~Exists(running))
    return Q(holder__isnull=True, claimed_at__lt=long_ago) | run_gone


def claim(lease: str, *, task: str, task_id: str, queued_for: float, using: str) -> str:
    """Claim key ``lease`` for run ``task_id``; return the task id whose claim it is (it
    is ``task_id`` if the claim is now this run's: new, stale, or already its own)."""
    with transaction.atomic(using=using):
        taken = (
            TaskClaim.objects.using(using)
            .filter(_stale(queued_for) | Q(task_id=task_id), lease=lease)
            .update(task=task, task_id=task_id, claimed_at=Now(), holder=None)
        )
        if taken:
            return task_id
        TaskClaim.objects.using(using).bulk_create(
            [TaskClaim(lease=lease, task=task, task_id=task_id)], ignore_conflicts=True
        )
        found = TaskClaim.objects.using(using).filter(lease=lease).values_list("task_id")
        row = found.first()
    # None: the claim we conflicted with was finished meanwhile; the key is free again.
    return (
        row[0]
        if row is not None
        else claim(lease, task=task, task_id=task_id, queued_for=queued_for, using=using)
    )


def running(lease: str, task_id: str, *, holder: int, using: str) -> None:
    """Run ``task_id`` took its key as ``holder``: its claim lives as long as that term."""
    TaskClaim.objects.using(using).filter(lease=lease, task_id=task_id).update(holder=holder)


def finish(lease: str, task_id: str, *, holder: int, using: str) -> None:
    """Run ``task_id`` ended: delete its claim, unless the run claimed the key again
    meanwhile (a retry queued under the same id)."""
    TaskClaim.objects.using(using).filter(lease=lease, task_id=task_id, holder=holder).delete()


def revoked(task_id: str, *, using: str) -> int:
    """Run ``task_id`` will never run: delete its claims; return how many."""
    deleted, _ = TaskClaim.objects.using(using).filter(task_id=task_id).delete()
    return deleted


def holding(lease: str, *, using: str) -> str | None:
    """The task id whose claim key ``lease`` is, live or stale (a read)."""
    return (
        TaskClaim.objects.using(using).filter(lease=lease).values_list("task_id", flat=True).first()
    )


@dataclass(frozen=True, kw_only=True)
class HeldKey:
    """A task key's lease held now, with its holder's registration and claim (if any)."""

    lease: str
    epoch: int
    holder: int
    host: str
    pid: int
    since: datetime
    expires_at: datetime
    task_id: str | None


def held(prefix: str, *, using: str) -> list[HeldKey]:
    """Every unexpired lease named ``prefix…`` with a holder, oldest first (two reads)."""
    rows = list(
        Lease.objects.using(using)
        .filter(name__startswith=prefix, holder__isnull=False, expires_at__gt=Now())
        .select_related("holder")
        .order_by("acquired_at")
    )
    names = [row.name for row in rows]
    task_ids = dict(
        TaskClaim.objects.using(using).filter(lease__in=names).values_list("lease", "task_id")
    )
    return [
        HeldKey(
            lease=row.name,
            epoch=row.epoch,
            holder=row.holder.pk,
            host=row.holder.host,
            pid=row.holder.pid,
            since=row.acquired_at or row.expires_at,  # acquired_at is set by every take
            expires_at=row.expires_at,
            task_id=task_ids.get(row.name),
        )
        for row in rows
        if row.holder is not None and row.expires_at is not None
    ]
