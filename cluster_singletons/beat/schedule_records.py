"""The beat's per-schedule records (``ScheduleRecord``): what operators set on a schedule
(pause, overlap and catch-up overrides) and what the beat says of it (its problem).

Statements and their invariants:

- ``operator_settings``, ``problems``, ``record_keys``, ``last_ticks``, ``paused_ticks``:
  reads.
- ``set_paused``: an operator's write (admin, commands), not a leader's.
- ``flag``: fenced on the beat's term: the schedule's problem and an ``error`` row in the
  run ledger, in one transaction; a deposed leader flags nothing (it logs the problem).
- ``note_problems``: fenced on the beat's term: a problem cleared once its schedule runs
  again, or ``catalog.DELETED`` once no source defines it; only existing records change.

Keys are stored under ``key_prefix`` (``deployment``): each deployment sees its own
records; callers pass and get keys unprefixed.

A record's ``last_tick`` is written by the ledger, in the same fenced transaction as the
runs it accounts for.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from django.db import transaction
from django.db.models import Q

from cluster_singletons import deployment, metrics
from cluster_singletons.beat.ledger import Intent, record
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.models import SCHEDULE_KEY_MAX, Run, ScheduleRecord

logger = logging.getLogger("cluster_singletons.beat")
T = TypeVar("T")

#: Schedules looked up by key up to this many; more (a first load): one scan.
_BY_KEY = 1000
_CHUNK = 10_000


def last_ticks(keys: list[str], *, using: str) -> dict[str, datetime | None]:
    """The recorded ``last_tick`` of these schedules (those the ledger has; a read)."""
    records = ScheduleRecord.objects.using(using)
    if len(keys) > _BY_KEY:  # one scan beats thousands of IN lists
        wanted = set(keys)
        with _scanning(using):
            rows = (
                records.filter(_mine()).values_list("key", "last_tick").iterator(chunk_size=_CHUNK)
            )
            found = ((deployment.loaded(key), tick) for key, tick in rows)
            return {key: tick for key, tick in found if key in wanted}
    stored = [deployment.stored(key) for key in keys]
    return _by_key(records.filter(key__in=stored).values_list("key", "last_tick"))


def paused_ticks(*, using: str) -> dict[str, datetime | None]:
    """The paused schedules and the last tick their records say passed (a read)."""
    rows = ScheduleRecord.objects.using(using).filter(_mine(), paused=True)
    return _by_key(rows.values_list("key", "last_tick"))


def flag(
    schedules: Sequence[Schedule],
    *,
    logged: Container[str],
    at: datetime,
    term: Term,
    using: str,
    ttl: float,
) -> None:
    """Record why these schedules cannot run (their ``problem``) on their records and as
    an ``error`` row at ``at`` each, in one transaction fenced on ``term``; one ERROR line
    each, unless its traceback was ``logged`` already."""
    for schedule in schedules:
        if schedule.key not in logged:
            logger.error("schedule %s cannot run: %s", schedule.key, schedule.problem)
        metrics.SCHEDULE_ERRORS.labels(metrics.schedule_label(schedule.key)).inc()
    # A key too long to store is only logged: it has no record to hold it.
    problems = {
        s.key: s.problem for s in schedules if len(deployment.stored(s.key)) <= SCHEDULE_KEY_MAX
    }
    intents = [
        Intent(schedule=key, tick=at, status=Run.Status.ERROR, reason=problem)
        for key, problem in problems.items()
    ]
    with fencing.fenced(term, using=using, ttl=ttl):
        ScheduleRecord.objects.using(using).bulk_create(
            [
                ScheduleRecord(key=deployment.stored(key), problem=problem)
                for key, problem in problems.items()
            ],
            update_conflicts=True,
            unique_fields=["key"],
            update_fields=["problem"],
        )
        record(intents, last_ticks={}, term=None, using=using, ttl=ttl)


def set_paused(key: str, note: str | None, *, using: str) -> None:
    """Pause schedule ``key`` with ``note`` saying why, or resume it (``None``)."""
    ScheduleRecord.objects.using(using).update_or_create(
        key=deployment.stored(key), defaults={"paused": note is not None, "pause_note": note or ""}
    )


def problems(*, using: str, excluding: Iterable[str] = ()) -> dict[str, str]:
    """The schedules whose record states a problem (other than those ``excluding``), and
    the problem (a read)."""
    rows = ScheduleRecord.objects.using(using).filter(_mine()).exclude(problem__in=["", *excluding])
    return _by_key(rows.values_list("key", "problem"))


def record_keys(*, using: str) -> set[str]:
    """Every schedule key with a record (a read, at the start of a term)."""
    rows = ScheduleRecord.objects.using(using).filter(_mine()).values_list("key", flat=True)
    with _scanning(using):
        return {deployment.loaded(key) for key in rows.iterator(chunk_size=_CHUNK)}


def _mine() -> Q:
    return deployment.schedules("key")


def _by_key(rows: Iterable[tuple[str, T]]) -> dict[str, T]:
    """Stored (key, value) pairs of this deployment, by the key the code knows."""
    return {deployment.loaded(key): value for key, value in rows}


def _scanning(using: str) -> transaction.Atomic:
    """A scan in chunks uses a server-side cursor on PostgreSQL, which lives only as long
    as its transaction: in autocommit a transaction-pooling PgBouncer may run each fetch on
    another server connection ("portal ... does not exist"). So scans run in one."""
    return transaction.atomic(using=using)


def note_problems(notes: dict[str, str], *, term: Term, using: str, ttl: float) -> None:
    """Set the problem of these schedules' existing records (``""``: none any more), in
    one transaction fenced on ``term``; records are not created for this (no notes: no
    transaction)."""
    if not notes:
        return
    by_text: dict[str, list[str]] = {}
    for key, text in notes.items():
        by_text.setdefault(text, []).append(deployment.stored(key))
    with fencing.fenced(term, using=using, ttl=ttl):
        for text, keys in by_text.items():
            rows = ScheduleRecord.objects.using(using).filter(key__in=keys)
            rows.exclude(problem=text).update(problem=text)


def operator_settings(*, using: str) -> tuple[frozenset[str], dict[str, tuple[str, float | None]]]:
    """What operators set on schedule records, in one read: the paused keys, and the
    overrides (key -> overlap or "", catch-up horizon or None) of records that set either."""
    rows = ScheduleRecord.objects.using(using).filter(
        _mine(), Q(paused=True) | ~Q(overlap="") | Q(skip_if_older_than__isnull=False)
    )
    paused, overrides = set(), {}
    for key, is_paused, overlap, skip in rows.values_list(
        "key", "paused", "overlap", "skip_if_older_than"
    ):
        key = deployment.loaded(key)
        if is_paused:
            paused.add(key)
        if overlap or skip is not None:
            overrides[key] = (overlap, skip)
    return frozenset(paused), overrides
