"""``@cron`` functions: run inside the leading runner at every tick of a cron expression.

Decorating records a ``Schedule`` keyed ``cron:<name>`` at import time; the leading beat
plans its ticks through the same run ledger as Celery tasks, so each tick runs once across
the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cluster_singletons._registration import register_once
from cluster_singletons.beat import timetables
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.timetables import Cron
from cluster_singletons.errors import ScheduleInvalid, SingletonConfigError
from cluster_singletons.names import OVERLAPS, Overlap

_crons: dict[str, Schedule] = {}


def cron(
    name: str,
    expression: str,
    *,
    tz: str | None = None,
    skip_if_older_than: float | None = None,
    overlap: Overlap | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run ``fn(run)`` inside the leading runner at every tick of ``expression`` in ``tz``.

    Ticks go through the same run ledger as Celery tasks, so each runs once across the
    cluster; ``run`` is the ledger row (its ``tick``, ``task_id``). Errors at import time
    (bad expression or zone, duplicate name) name the schedule.
    """
    if overlap is not None and overlap not in OVERLAPS:
        raise SingletonConfigError(name, f"overlap must be one of {OVERLAPS}, not {overlap!r}")
    try:
        timetable = Cron(expression, timetables.zone(tz))
    except ScheduleInvalid as exc:
        raise SingletonConfigError(name, str(exc)) from exc

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = f"cron:{name}"
        schedule = Schedule(
            key=key,
            source="cron",
            timetable=timetable,
            fn=fn,
            skip_if_older_than=skip_if_older_than,
            overlap=overlap,
        )
        register_once(
            _crons, key, schedule, name=name, fn=fn, registered_fn=lambda s: s.fn, what="cron"
        )
        return fn

    return register


def registered() -> Iterable[Schedule]:
    """Every ``@cron`` schedule declared so far."""
    return _crons.values()
