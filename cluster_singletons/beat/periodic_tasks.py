"""The store of django-celery-beat's tables, as the beat reads and keeps them.

Statements and their invariants:

- ``rows``: every ``PeriodicTask`` with its schedule's columns, in one query and without
  model instances, raw where Django would convert (a read); a row that cannot be read is
  reported by name, never fails the others.
- ``signature``: changes whenever a column deciding what or when a task runs changes. On
  PostgreSQL a digest the server computes over every defining column, so bulk
  ``update()``s are seen too; elsewhere a cheap summary (count, newest ``date_changed``,
  ``PeriodicTasks.last_update``), completed by the engine's full reread every minute.
- ``record_runs``: django-celery-beat's own bookkeeping for its admin (``last_run_at``,
  ``total_run_count``; one-off tasks disabled once run). Not fenced, and safe for a
  deposed leader: it only describes runs that were published, and the ledger, not these
  columns, decides what runs (``last_run_at`` is read only when a schedule is new to the
  ledger). This process keeps count of what it wrote, so ``bookkeeping`` can tell its
  own writes from another scheduler's.
- ``bookkeeping``: the run bookkeeping of every row in one aggregate, and the rows saved
  lately, with what this process itself wrote into them (reads); None while a
  ``record_runs`` of this process overlaps them, so the two always agree.
- ``mirror``: what DatabaseScheduler does when it starts, for the rows that exist: each
  Celery ``beat_schedule`` entry written into the row of its name with
  django-celery-beat's own conversion (the row keeps ``enabled``, ``one_off``, its last
  run and count; every other defining column is the entry's). Not fenced: the entries are
  the code's, the same on every node running it, as with DatabaseScheduler.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.db import DatabaseError, connections, transaction
from django.db.models import CharField, Count, F, Max, Sum
from django.db.models.functions import Cast

from cluster_singletons.errors import describe

if TYPE_CHECKING:
    from cluster_singletons.beat.schedule import Schedule
    from cluster_singletons.models import Run

logger = logging.getLogger("cluster_singletons.beat")

#: The columns ``rows`` reads, in order.
FIELDS = (
    "name",
    "task",
    "args",
    "kwargs",
    "queue",
    "exchange",
    "routing_key",
    "headers",
    "priority",
    "expires",
    "expire_seconds",
    "one_off",
    "start_time",
    "enabled",
    "interval__every",
    "interval__period",
    "crontab__minute",
    "crontab__hour",
    "crontab__day_of_month",
    "crontab__month_of_year",
    "crontab__day_of_week",
    "crontab_zone",
    "solar__event",
    "solar__latitude",
    "solar__longitude",
    "clocked__clocked_time",
    "date_changed",
    "last_run_at",
)


@functools.cache
def _digest_sql() -> str:
    """PostgreSQL: one row that changes whenever any column deciding what or when
    django-celery-beat's tasks run changes (``last_run_at`` and the run count excluded)."""
    from django_celery_beat.models import (
        ClockedSchedule,
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
        SolarSchedule,
    )

    skipped = {"last_run_at", "total_run_count", "date_changed", "description"}
    columns = [f.column for f in PeriodicTask._meta.concrete_fields if f.name not in skipped]
    row = "concat_ws('|', " + ", ".join(f'"{c}"' for c in columns) + ")"
    parts = [f"(SELECT md5(string_agg({row}, ',' ORDER BY id)) FROM {PeriodicTask._meta.db_table})"]
    for model in (CrontabSchedule, IntervalSchedule, SolarSchedule, ClockedSchedule):
        table = model._meta.db_table
        parts.append(f"(SELECT md5(string_agg(t::text, ',' ORDER BY t.id)) FROM {table} t)")
    return "SELECT " + ", ".join(parts)


def rows(*, using: str) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    """Every ``PeriodicTask`` as a tuple of ``FIELDS``, and the names of those whose row
    cannot be read, with why (a read).

    Columns are read raw where Django would convert them (a crontab's zone is text here,
    not a zone object), so a bad value fails only that row's schedule. Should a row fail
    to read anyway, the rows are read again one by one and only that one is left out.
    """
    from django_celery_beat.models import PeriodicTask

    tasks = PeriodicTask.objects.using(using)
    query = tasks.annotate(crontab_zone=Cast("crontab__timezone", output_field=CharField()))
    try:
        return list(query.values_list(*FIELDS)), {}
    except DatabaseError:
        raise
    except Exception:  # one row's value: found and reported by the row-by-row read below
        logger.warning("a django-celery-beat row cannot be read; reading them one by one")
    found: list[tuple[Any, ...]] = []
    unreadable: dict[str, str] = {}
    for pk, name in tasks.values_list("pk", "name"):
        try:
            found.extend(query.filter(pk=pk).values_list(*FIELDS))
        except DatabaseError:
            raise
        except Exception as exc:
            unreadable[name] = f"its row cannot be read: {describe(exc)}"
    return found, unreadable


def signature(using: str) -> object:
    """A value that changes when django-celery-beat's schedules change (None: not
    installed); see the module docstring."""
    if not apps.is_installed("django_celery_beat"):
        return None
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    if connections[using].vendor == "postgresql":
        with connections[using].cursor() as cursor:
            cursor.execute(_digest_sql())
            return cursor.fetchone()
    stats = PeriodicTask.objects.using(using).aggregate(n=Count("id"), changed=Max("date_changed"))
    last = PeriodicTasks.objects.using(using).values_list("last_update", flat=True)
    return stats["n"], stats["changed"], list(last)


@dataclass
class _Ours:
    """What this process's ``record_runs`` wrote (guarded by ``lock``)."""

    lock: threading.Lock
    #: Writes under way now, and writes ended so far.
    writing: int = 0
    ended: int = 0
    #: Runs counted into ``total_run_count``, and the ``last_run_at`` last written by name.
    counted: int = 0
    last_run_at: dict[str, datetime] = field(default_factory=dict)


_OURS = _Ours(threading.Lock())


@dataclass(frozen=True, kw_only=True)
class Bookkeeping:
    """django-celery-beat's run bookkeeping over all rows, and this process's share."""

    rows: int
    #: The sum of ``total_run_count``; the newest ``last_run_at`` and ``date_changed``.
    runs: int
    last_run_at: datetime | None
    last_saved: datetime | None
    #: (name, last_run_at) of the rows saved (``save()``, not ``update()``) after the time
    #: asked for.
    saved: tuple[tuple[str, datetime | None], ...]
    #: Runs this process counted so far, and the ``last_run_at`` it last wrote into each
    #: of the rows in ``saved``.
    ours: int
    our_last_runs: Mapping[str, datetime]


def record_runs(names: list[str], *, one_off: list[str], at: datetime, using: str) -> None:
    """Runs of these tasks were published at ``at``: count them, and disable the one-off
    tasks among them (``one_off``)."""
    from django_celery_beat.models import PeriodicTask

    tasks = PeriodicTask.objects.using(using).filter(name__in=names)
    counted = 0
    with _OURS.lock:
        _OURS.writing += 1
    try:
        counted = tasks.update(last_run_at=at, total_run_count=F("total_run_count") + 1)
    finally:
        with _OURS.lock:
            _OURS.writing -= 1
            _OURS.ended += 1
            _OURS.counted += counted
            if counted:
                _OURS.last_run_at.update(dict.fromkeys(names, at))
    if one_off:
        tasks.filter(name__in=one_off).update(enabled=False)


def after_publish(
    runs: Sequence[Run], schedules: Mapping[str, Schedule], at: datetime, using: str
) -> None:
    """Keep django-celery-beat's bookkeeping true for its admin once runs of its tasks
    were published: last run, run count, and one-off tasks disabled once run."""
    names = [r.schedule.partition(":")[2] for r in runs if r.schedule.startswith("periodic:")]
    if not names or not apps.is_installed("django_celery_beat"):
        return
    one_off = [n for n in names if (s := schedules.get(f"periodic:{n}")) and s.one_off]
    record_runs(names, one_off=one_off, at=at, using=using)


def bookkeeping(*, using: str, saved_after: datetime | None) -> Bookkeeping | None:
    """The rows' run bookkeeping, the rows saved after ``saved_after`` (None: none), and
    this process's share; None when a write of this process overlapped the reads."""
    from django_celery_beat.models import PeriodicTask

    with _OURS.lock:
        if _OURS.writing:
            return None
        ended, ours = _OURS.ended, _OURS.counted
    tasks = PeriodicTask.objects.using(using)
    stats = tasks.aggregate(
        rows=Count("id"),
        runs=Sum("total_run_count"),
        last=Max("last_run_at"),
        saved=Max("date_changed"),
    )
    saved: tuple[tuple[str, datetime | None], ...] = ()
    if saved_after is not None:
        saved = tuple(tasks.filter(date_changed__gt=saved_after).values_list("name", "last_run_at"))
    with _OURS.lock:
        if _OURS.writing or _OURS.ended != ended:
            return None
        mine = {name: _OURS.last_run_at[name] for name, _ in saved if name in _OURS.last_run_at}
    return Bookkeeping(
        rows=stats["rows"],
        runs=stats["runs"] or 0,
        last_run_at=stats["last"],
        last_saved=stats["saved"],
        saved=saved,
        ours=ours,
        our_last_runs=mine,
    )


def mirror(entries: Mapping[str, Mapping[str, Any]], *, using: str) -> list[str]:
    """Write each entry into the existing row of its name as DatabaseScheduler's start
    does; the names written. An entry django-celery-beat cannot convert is logged with its
    traceback and its row left as it is, as DatabaseScheduler does."""
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import ModelEntry

    tasks = PeriodicTask.objects.using(using)
    existing = {row.name: row for row in tasks.filter(name__in=list(entries))}
    written = []
    for name in sorted(existing):
        try:
            with transaction.atomic(using=using):
                fields = ModelEntry._unpack_fields(**entries[name])
                if all(getattr(existing[name], k) == v for k, v in fields.items()):
                    continue  # as it is: an unchanged row is not saved (no edit to reload)
                tasks.update_or_create(name=name, defaults=fields)
        except DatabaseError:
            raise
        except Exception as exc:  # this entry only, as DatabaseScheduler does
            logger.exception(
                "beat_schedule entry %s cannot be written into its django-celery-beat row (%s)",
                name,
                describe(exc),
            )
            continue
        written.append(name)
    return written
