"""What the beat schedules, from three sources, in one shape.

- django-celery-beat's ``PeriodicTask`` rows (crontab, interval, clocked and solar
  schedules), when that app is installed: key ``periodic:<name>``.
- Celery's ``beat_schedule`` setting: key ``beat:<name>``.
- ``@cron("name", "*/5 * * * *", tz=...)`` functions, run inside the leading runner:
  key ``cron:<name>``.

A schedule that cannot be computed (bad cron expression, unknown zone or task name) is
still returned, with ``problem`` set and no timetable: the beat flags it and schedules
everything else. Nothing here touches the broker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from django.apps import apps
from django.conf import settings as django_settings

from cluster_singletons.beat import timetables
from cluster_singletons.beat.timetables import Cron, Every, Once, Solar, Timetable
from cluster_singletons.errors import ScheduleInvalid, SingletonConfigError

logger = logging.getLogger("cluster_singletons.schedules")

Overlap = Literal["skip", "buffer_one", "allow_all"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "buffer_one", "allow_all")
#: Options of a ``beat_schedule`` entry that belong to the beat, not to ``send_task``.
BEAT_OPTIONS = ("skip_if_older_than", "overlap", "calculate_next_run_from_previous")
_PERIODS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1, "microseconds": 1e-6}


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """One schedule, whatever its source. ``fn`` is set for in-runner ``@cron`` functions,
    ``task`` (a Celery task name) for everything else."""

    key: str
    source: Literal["periodic", "beat", "cron"]
    timetable: Timetable | None
    task: str = ""
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    skip_if_older_than: float | None = None
    overlap: Overlap | None = None
    from_previous: bool = False
    one_off: bool = False
    enabled: bool = True
    start_time: datetime | None = None
    expires: datetime | None = None
    problem: str = ""
    #: When the schedule was last edited, if its source knows; ticks start after it.
    changed_at: datetime | None = field(default=None, compare=False)
    #: The source's own record of the last run (django-celery-beat's ``last_run_at``).
    last_run_at: datetime | None = field(default=None, compare=False)
    #: The source row this was built from, to skip rebuilding unchanged ones.
    source_row: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.key.partition(":")[2]

    @cached_property
    def fingerprint(self) -> str:
        """Changes when anything that decides ticks or messages changes."""
        parts = [
            self.key,
            repr(self.timetable),
            self.task,
            _qualname(self.fn) if self.fn else "",
            json.dumps([self.args, self.kwargs, self.options], sort_keys=True, default=str),
            repr(
                (
                    self.skip_if_older_than,
                    self.overlap,
                    self.from_previous,
                    self.one_off,
                    self.enabled,
                    self.start_time,
                    self.expires,
                    self.problem,
                )
            ),
        ]
        return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()

    def first_tick_after(self, after: datetime) -> datetime | None:
        """The first tick after ``after`` that this schedule runs, honouring start and expiry."""
        if self.timetable is None or not self.enabled:
            return None
        if self.start_time is not None and after < self.start_time:
            after = self.start_time - timedelta(microseconds=1)
        tick = self.timetable.next_after(after)
        if tick is None or (self.expires is not None and tick > self.expires):
            return None
        return tick


# -- @cron -------------------------------------------------------------------------------

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
        existing = _crons.get(key)
        if existing is not None and existing.fn and _qualname(existing.fn) != _qualname(fn):
            raise SingletonConfigError(
                name, f"cron registered twice: by {_qualname(existing.fn)} and by {_qualname(fn)}"
            )
        _crons[key] = Schedule(
            key=key,
            source="cron",
            timetable=timetable,
            fn=fn,
            skip_if_older_than=skip_if_older_than,
            overlap=overlap,
        )
        return fn

    return register


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


# -- loading -----------------------------------------------------------------------------


def load_all(
    app: Any, *, using: str, previous: Mapping[str, Schedule] | None = None
) -> dict[str, Schedule]:
    """Every schedule of every source, by key; task names are checked against ``app``.

    A ``PeriodicTask`` whose row is unchanged since ``previous`` comes back as the very
    same object, so rereading many schedules costs little more than reading their rows."""
    found: dict[str, Schedule] = dict(_crons)
    found.update(from_beat_schedule(app.conf.beat_schedule or {}, tz=app.conf.timezone))
    if apps.is_installed("django_celery_beat"):
        found.update(from_periodic_tasks(using=using, previous=previous or {}))
    known = set(app.tasks.keys())
    for key, schedule in found.items():
        if schedule.task and not schedule.problem and schedule.task not in known:
            found[key] = replace(
                schedule, timetable=None, problem=f"unknown task {schedule.task!r}"
            )
    return found


def from_beat_schedule(
    entries: Mapping[str, Mapping[str, Any]], *, tz: str | None = None
) -> dict[str, Schedule]:
    """Celery's ``beat_schedule``; beat options (``overlap``...) may sit in ``options``.
    Crontabs are in ``tz``, Celery's ``timezone`` setting, as Celery's own beat reads them."""
    found = {}
    for name, entry in entries.items():
        key = f"beat:{name}"
        options = dict(entry.get("options") or {})
        beat_options = {k: options.pop(k) for k in BEAT_OPTIONS if k in options}
        base = Schedule(
            key=key,
            source="beat",
            timetable=None,
            task=str(entry.get("task", "")),
            args=tuple(entry.get("args") or ()),
            kwargs=dict(entry.get("kwargs") or {}),
            options=options,
        )
        try:
            found[key] = replace(
                base,
                timetable=_celery_timetable(entry.get("schedule"), tz),
                **_beat_options(beat_options),
            )
        except ScheduleInvalid as exc:
            found[key] = replace(base, problem=str(exc))
    return found


def _celery_timetable(value: Any, tz: str | None) -> Timetable:
    from celery.schedules import crontab, schedule, solar

    if isinstance(value, int | float):
        return Every(float(value))
    if isinstance(value, timedelta):
        return Every(value.total_seconds())
    if isinstance(value, crontab):
        expression = " ".join(
            str(getattr(value, f"_orig_{part}"))
            for part in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        )
        return Cron(expression, timetables.zone(tz))
    if isinstance(value, solar):
        return Solar(value.event, float(value.lat), float(value.lon))
    if isinstance(value, schedule):
        every: timedelta = getattr(value, "run_every")  # noqa: B009 (untyped in the stubs)
        return Every(every.total_seconds())
    raise ScheduleInvalid(f"unsupported schedule {value!r}")


def _beat_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "skip_if_older_than" in raw:
        try:
            out["skip_if_older_than"] = float(raw["skip_if_older_than"])
        except (TypeError, ValueError) as exc:
            raise ScheduleInvalid(f"skip_if_older_than must be seconds: {exc}") from exc
    if "overlap" in raw:
        if raw["overlap"] not in OVERLAPS:
            raise ScheduleInvalid(f"overlap must be one of {OVERLAPS}, not {raw['overlap']!r}")
        out["overlap"] = raw["overlap"]
    if "calculate_next_run_from_previous" in raw:
        out["from_previous"] = bool(raw["calculate_next_run_from_previous"])
    return out


_PERIODIC_FIELDS = (
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
    "crontab__timezone",
    "solar__event",
    "solar__latitude",
    "solar__longitude",
    "clocked__clocked_time",
    "date_changed",
    "last_run_at",
)


def from_periodic_tasks(
    *, using: str, previous: Mapping[str, Schedule] | None = None
) -> dict[str, Schedule]:
    """django-celery-beat's ``PeriodicTask`` rows, read in one query (no model instances);
    rows unchanged since ``previous`` (``last_run_at`` aside) reuse its objects."""
    from django_celery_beat.models import PeriodicTask

    previous = previous or {}
    found = {}
    for row in PeriodicTask.objects.using(using).values_list(*_PERIODIC_FIELDS):
        key = f"periodic:{row[0]}"
        before = previous.get(key)
        if before is not None and before.source_row == row[:-1]:
            found[key] = before
        else:
            found[key] = _periodic(dict(zip(_PERIODIC_FIELDS, row, strict=True)), row[:-1])
    return found


def _periodic(row: dict[str, Any], source_row: tuple[Any, ...]) -> Schedule:
    identity: dict[str, Any] = {
        "key": f"periodic:{row['name']}",
        "source": "periodic",
        "task": row["task"],
        "enabled": bool(row["enabled"]),
        "changed_at": _aware(row["date_changed"]),
        "last_run_at": _aware(row["last_run_at"]),
        "source_row": source_row,
    }
    try:
        options = {k: row[k] for k in ("queue", "exchange", "routing_key", "priority") if row[k]}
        headers = _json(row["headers"] or "{}", "headers", dict)
        if headers:
            options["headers"] = headers
        if row["expire_seconds"]:
            options["expires"] = int(row["expire_seconds"])
        return Schedule(
            **identity,
            timetable=_periodic_timetable(row),
            args=tuple(_json(row["args"] or "[]", "args", list)),
            kwargs=_json(row["kwargs"] or "{}", "kwargs", dict),
            options=options,
            one_off=bool(row["one_off"]),
            start_time=_aware(row["start_time"]),
            expires=_aware(row["expires"]),
        )
    except ScheduleInvalid as exc:
        return Schedule(**identity, timetable=None, problem=str(exc))


def _periodic_timetable(row: dict[str, Any]) -> Timetable:
    if row["interval__every"] is not None:
        period = _PERIODS.get(row["interval__period"])
        if period is None:
            raise ScheduleInvalid(f"unknown interval period {row['interval__period']!r}")
        anchor = _aware(row["start_time"]) or timetables.UNIX_EPOCH
        return Every(float(row["interval__every"]) * period, anchor)
    if row["crontab__minute"] is not None:
        expression = " ".join(
            str(row[f"crontab__{part}"])
            for part in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        )
        tz = row["crontab__timezone"]
        return Cron(expression, timetables.zone(str(tz) if tz else _default_zone()))
    if row["clocked__clocked_time"] is not None:
        return Once(_aware(row["clocked__clocked_time"]) or row["clocked__clocked_time"])
    if row["solar__event"] is not None:
        return Solar(
            row["solar__event"], float(row["solar__latitude"]), float(row["solar__longitude"])
        )
    raise ScheduleInvalid("no schedule (interval, crontab, clocked or solar) is set")


def _default_zone() -> str:
    return str(getattr(django_settings, "CELERY_TIMEZONE", None) or django_settings.TIME_ZONE)


def _json(text: str, what: str, kind: type[Any]) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ScheduleInvalid(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise ScheduleInvalid(f"{what} must be a JSON {kind.__name__}, not {type(value).__name__}")
    return value


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def crons() -> Iterable[Schedule]:
    return _crons.values()


@functools.cache
def periodic_digest_sql() -> str:
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
