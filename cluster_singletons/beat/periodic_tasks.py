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
  ledger).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.db import DatabaseError, connections
from django.db.models import CharField, Count, F, Max
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


def record_runs(names: list[str], *, one_off: list[str], at: datetime, using: str) -> None:
    """Runs of these tasks were published at ``at``: count them, and disable the one-off
    tasks among them (``one_off``)."""
    from django_celery_beat.models import PeriodicTask

    tasks = PeriodicTask.objects.using(using).filter(name__in=names)
    tasks.update(last_run_at=at, total_run_count=F("total_run_count") + 1)
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
