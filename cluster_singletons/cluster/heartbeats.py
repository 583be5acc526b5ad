"""The heartbeat store: one row per singleton, ``@cron`` function and the beat, recording
that the leader work behind it made progress.

Invariants:

- ``beat_at`` / ``failed_at`` are the database's clock at the execution they record.
- A write touches only the named row; the counters only ever grow.
- Names are stored under ``key_prefix`` (``deployment``); callers pass and get them
  unprefixed, and see only their deployment's rows.
- Not fenced, and safe for a deposed leader: a heartbeat is a report, not an effect. It
  carries the writer's runner id and epoch, so a late heartbeat of a deposed leader shows
  as its own; the status it can keep green lasts at most until the next leader's first
  heartbeat or the staleness threshold.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Now

from cluster_singletons import deployment, metrics
from cluster_singletons.conf import get_settings
from cluster_singletons.models import Heartbeat


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
    stored = deployment.stored(name)
    rows = Heartbeat.objects.using(db).filter(name=stored)
    if rows.update(**fields):
        return
    try:
        with transaction.atomic(using=db):
            Heartbeat.objects.using(db).create(
                name=stored,
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


def by_name(*, using: str) -> dict[str, Heartbeat]:
    """This deployment's heartbeats, by name without the ``key_prefix`` (a read)."""
    rows = Heartbeat.objects.using(using).filter(deployment.heartbeats())
    return {deployment.loaded(row.name): row for row in rows}
