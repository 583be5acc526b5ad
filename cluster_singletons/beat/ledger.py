"""The run ledger: one row per (schedule, tick), written fenced, published after commit.

The schedules' records (``schedule_records``) keep their last tick, written here in the
same transaction as the runs.

Invariants:

- ``schedule`` is stored under ``key_prefix`` (``deployment``): each deployment sharing
  the database reads and writes only its own rows; callers pass and get keys unprefixed.
- ``(schedule, tick)`` is unique, so a tick is recorded, and therefore dispatched, at most
  once whoever leads; a clash (a backfill or run-now already took the tick) drops only the
  clashing intent.
- A ``pending`` row is an intent to publish. The task id is a pure function of the
  schedule and tick, so a row re-published by the next leader carries the same id and a
  consumer can tell a re-publication from a new run.
- Workers report ``started`` / ``succeeded`` / ``failed`` (task signals), which is how the
  overlap policy knows across machines whether a run has finished.

The writes (their invariants), and whether each is fenced:

- ``record``: fenced on the beat lease's term (one transaction with the schedules' new
  ``last_tick``): a deposed leader's batch commits nothing. Operator commands (run now,
  backfill) and claimed deliveries record with ``term=None`` or inside their own fence.
- ``mark_published``: not fenced. It only moves a ``pending`` row the caller itself just
  published to ``published``; a deposed leader that published did publish, and the next
  leader republishes pending rows under the same task id either way.
- ``fail``: not fenced. A row whose message cannot be built (the same code and row on any
  leader) leaves ``pending`` for ``error``; only ``pending`` rows change.
- ``report``: workers, not leaders; only moves a run forward (never reopens a finished one).
- ``revive_skipped``, ``prune``: operators, not leaders; ``prune`` keeps rows still
  ``pending``.

Everything else here is a read.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Q
from django.db.models.functions import Now

from cluster_singletons import deployment
from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.models import Run, ScheduleRecord

if TYPE_CHECKING:
    from cluster_singletons.beat.schedule import Schedule

#: Task ids are uuid5(NAMESPACE, "<schedule>|<tick ISO>").
NAMESPACE = uuid.UUID("5c3f4e1e-8f6b-4b7a-9a43-1b3c6a0d2e71")
HEADER = "cluster_run"


def task_id(schedule: str, tick: datetime) -> str:
    """The deterministic task id of ``schedule``'s run for ``tick``."""
    return str(uuid.uuid5(NAMESPACE, f"{schedule}|{tick.isoformat()}"))


@dataclass(frozen=True, kw_only=True)
class Intent:
    """A row to record: a run to dispatch (``pending``) or a tick skipped or in error."""

    schedule: str
    tick: datetime
    status: str = Run.Status.PENDING
    kind: str = Run.Kind.SCHEDULED
    first_tick: datetime | None = None
    ticks: int = 1
    reason: str = ""
    task: str = ""
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def run_of(
        cls,
        schedule: Schedule,
        tick: datetime,
        *,
        kind: str = Run.Kind.SCHEDULED,
        reason: str = "",
        first_tick: datetime | None = None,
        ticks: int = 1,
    ) -> Intent:
        """A run of ``schedule`` for ``tick``: its task and message as the schedule says."""
        return cls(
            schedule=schedule.key,
            tick=tick,
            kind=kind,
            first_tick=first_tick,
            ticks=ticks,
            reason=reason,
            task=schedule.task,
            args=schedule.args,
            kwargs=dict(schedule.kwargs),
            options=dict(schedule.options),
        )

    def row(self, epoch: int | None) -> Run:
        """The row as stored: its key under this deployment's ``key_prefix``."""
        return Run(schedule=deployment.stored(self.schedule), tick=self.tick, **self.fields(epoch))

    def fields(self, epoch: int | None) -> dict[str, Any]:
        """The row's columns besides its identity (``schedule``, ``tick``)."""
        dispatches = self.status == Run.Status.PENDING
        return dict(
            first_tick=self.first_tick,
            ticks=self.ticks,
            kind=self.kind,
            status=self.status,
            reason=self.reason,
            task=self.task,
            task_id=task_id(deployment.stored(self.schedule), self.tick) if dispatches else "",
            message=json.dumps(
                {"args": list(self.args), "kwargs": self.kwargs, "options": self.options},
                default=str,
            )
            if dispatches
            else "",
            epoch=epoch,
        )


def revive_skipped(intents: Iterable[Intent], *, using: str) -> int:
    """Turn the ``skipped`` rows holding these intents' ticks into the intents (a backfill
    of skipped ticks); returns how many rows changed."""
    return sum(
        Run.objects.using(using)
        .filter(
            schedule=deployment.stored(intent.schedule), tick=intent.tick, status=Run.Status.SKIPPED
        )
        .update(**intent.fields(epoch=None))
        for intent in intents
    )


def record(
    intents: Iterable[Intent],
    *,
    last_ticks: dict[str, datetime],
    term: Term | None,
    using: str,
    ttl: float,
) -> list[Run]:
    """Insert ``intents`` and move each schedule's ``last_tick``, in one transaction fenced
    on ``term`` (``None``: unfenced, for operator commands). Returns the rows inserted;
    intents whose tick is already in the ledger are left out. Raises ``LeadershipLost``."""
    epoch = term.epoch if term is not None else None
    rows = [intent.row(epoch) for intent in intents]
    fence = fencing.fenced(term, using=using, ttl=ttl) if term else transaction.atomic(using=using)
    connection = connections[using]
    with fence:
        try:
            with transaction.atomic(using=using), connection.cursor() as cursor:
                # Raw executemany: the ORM's bulk_create builds one huge statement whose
                # compilation costs more than the insert itself at a thousand rows a second.
                cursor.executemany(
                    _insert_runs_sql(using), [_run_params(r, connection) for r in rows]
                )
            created = rows
        except IntegrityError:
            created = _insert_one_by_one(rows, using=using)
        if last_ticks:
            adapt = connection.ops.adapt_datetimefield_value
            with connection.cursor() as cursor:
                cursor.executemany(
                    _upsert_last_tick_sql(using),
                    [
                        (deployment.stored(key), adapt(tick), False, "", "", "")
                        for key, tick in last_ticks.items()
                    ],
                )
    return _loaded(created)


def _loaded(rows: list[Run]) -> list[Run]:
    """Rows read or written, their ``schedule`` as the code knows it (without the prefix;
    rows are changed by task id, never saved back)."""
    for row in rows:
        row.schedule = deployment.loaded(row.schedule)
    return rows


_RUN_COLUMNS = (
    *("schedule", "tick", "first_tick", "ticks", "kind", "status", "reason"),
    *("task", "task_id", "message", "epoch"),
)


def _run_params(row: Run, connection: BaseDatabaseWrapper) -> list[Any]:
    adapt = connection.ops.adapt_datetimefield_value
    return [
        *(row.schedule, adapt(row.tick), adapt(row.first_tick), row.ticks, row.kind),
        *(row.status, row.reason, row.task, row.task_id, row.message, row.epoch),
    ]


@functools.cache
def _insert_runs_sql(using: str) -> str:
    q = connections[using].ops.quote_name
    columns = ", ".join(q(c) for c in _RUN_COLUMNS)
    values = ", ".join(["%s"] * len(_RUN_COLUMNS))
    return f"INSERT INTO {q(Run._meta.db_table)} ({columns}) VALUES ({values})"


@functools.cache
def _upsert_last_tick_sql(using: str) -> str:
    """``last_tick`` of a schedule, creating its record if need be (``updated_at`` takes
    its database default)."""
    q = connections[using].ops.quote_name
    table = q(ScheduleRecord._meta.db_table)
    cols = ("key", "last_tick", "paused", "pause_note", "overlap", "problem")
    return (
        f"INSERT INTO {table} ({', '.join(q(c) for c in cols)}) VALUES (%s, %s, %s, %s, %s, %s) "
        f"ON CONFLICT ({q('key')}) DO UPDATE SET {q('last_tick')} = EXCLUDED.{q('last_tick')}"
    )


def _insert_one_by_one(rows: list[Run], *, using: str) -> list[Run]:
    created = []
    for row in rows:
        try:
            with transaction.atomic(using=using):
                row.save(using=using, force_insert=True)
        except IntegrityError:
            continue  # this tick is already in the ledger: it ran (or was skipped) once
        created.append(row)
    return created


def message(run: Run) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(run.message or "{}")
    return decoded


def mark_published(task_ids: Sequence[str], *, at: datetime, using: str) -> None:
    """``pending`` -> ``published`` at ``at``, when the leader sent it (a worker may already
    have reported it started)."""
    if task_ids:
        Run.objects.using(using).filter(task_id__in=task_ids, status=Run.Status.PENDING).update(
            status=Run.Status.PUBLISHED, published_at=at
        )


def fail(reasons: dict[str, str], *, using: str) -> None:
    """``pending`` -> ``error`` for runs that can never be published (task id: why)."""
    for task_id_, reason in reasons.items():
        Run.objects.using(using).filter(task_id=task_id_, status=Run.Status.PENDING).update(
            status=Run.Status.ERROR, reason=reason, finished_at=Now()
        )


def pending(*, until: datetime, using: str, limit: int = 1000) -> list[Run]:
    """Intents recorded but never marked published whose tick is due by ``until``, oldest
    first (the leader records ticks a little ahead; those wait for their time)."""
    return _loaded(
        list(
            Run.objects.using(using)
            .filter(deployment.schedules("schedule"), status=Run.Status.PENDING, tick__lte=until)
            .order_by("created_at", "id")[:limit]
        )
    )


def finished(task_ids: Iterable[str], *, using: str) -> set[str]:
    """Which of these runs (by task id) have finished (or no longer exist)."""
    wanted = set(task_ids)
    if not wanted:
        return set()
    open_ = set(
        Run.objects.using(using)
        .filter(task_id__in=wanted)
        .exclude(status__in=Run.FINISHED)
        .values_list("task_id", flat=True)
    )
    return wanted - open_


def report(task_id: str, status: str, *, using: str) -> int:
    """A worker's report on the run with this task id; returns the rows changed."""
    runs = Run.objects.using(using).filter(task_id=task_id)
    if status == Run.Status.STARTED:
        return runs.filter(status__in=[Run.Status.PENDING, Run.Status.PUBLISHED]).update(
            status=status
        )
    return runs.exclude(status__in=Run.FINISHED).update(status=status, finished_at=Now())


def prune(*, before: datetime, using: str) -> int:
    """Delete rows created before ``before``, except intents still waiting to be published."""
    deleted, _ = (
        Run.objects.using(using)
        .filter(deployment.schedules("schedule"), created_at__lt=before)
        .exclude(status=Run.Status.PENDING)
        .delete()
    )
    return deleted


def pending_count(*, using: str) -> int:
    """How many intents wait to be published (a read)."""
    rows = Run.objects.using(using).filter(deployment.schedules("schedule"))
    return rows.filter(status=Run.Status.PENDING).count()


def open_runs(*, since: datetime, using: str) -> list[tuple[str, str, datetime]]:
    """(task id, schedule, created at) of runs created since ``since`` that have not
    finished, oldest first (a read)."""
    rows = (
        Run.objects.using(using)
        .filter(deployment.schedules("schedule"), created_at__gte=since)
        .exclude(status__in=Run.FINISHED)
        .order_by("id")
        .values_list("task_id", "schedule", "created_at")
    )
    return [(task, deployment.loaded(key), created) for task, key, created in rows]


#: (schedule, tick, status, task id, created at) of a row a leader recorded.
Recorded = tuple[str, datetime, str, str, datetime]


def recorded_since(since: datetime | None, *, using: str) -> list[Recorded]:
    """The scheduled runs and skipped ticks created since ``since`` (None: every one),
    by tick (a read: how a standby follows the leader's ledger)."""
    rows = (
        Run.objects.using(using)
        .filter(deployment.schedules("schedule"), kind=Run.Kind.SCHEDULED)
        .exclude(status=Run.Status.ERROR)
    )
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    fields = ("schedule", "tick", "status", "task_id", "created_at")
    return [
        (deployment.loaded(key), tick, status, task, created)
        for key, tick, status, task, created in rows.order_by("tick").values_list(*fields)
    ]


def newest(*, using: str) -> datetime | None:
    """When the newest row was created (a read; None: the ledger is empty)."""
    rows = Run.objects.using(using).filter(deployment.schedules("schedule"))
    return rows.order_by("-created_at").values_list("created_at", flat=True).first()


def covered(
    key: str, start: datetime, end: datetime, *, using: str
) -> list[tuple[datetime, datetime]]:
    """The tick ranges of ``key`` that ran (or are on their way), overlapping [start, end]
    (a read; skipped and failed-to-build rows are not coverage)."""
    rows = (
        Run.objects.using(using)
        .filter(schedule=deployment.stored(key), tick__gte=start)
        .filter(Q(first_tick__isnull=True, tick__lte=end) | Q(first_tick__lte=end))
        .exclude(status__in=[Run.Status.SKIPPED, Run.Status.ERROR])
        .values_list("first_tick", "tick")
    )
    return [(first or tick, tick) for first, tick in rows]
