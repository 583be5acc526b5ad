"""Where the beat's schedules come from, turned into ``Schedule`` objects.

- django-celery-beat's ``PeriodicTask`` rows (crontab, interval, clocked and solar
  schedules), when that app is installed: key ``periodic:<name>``. Their messages carry
  the ``periodic_task_name`` header, as DatabaseScheduler's do; these and the entries
  below carry the ``celery_beat_task`` header Celery's beat sets.
- Celery's ``beat_schedule`` setting, with the default entry Celery's beat adds
  (``celery.backend_cleanup``, see ``beat_entries``): key ``beat:<name>``.
- ``@cron("name", "*/5 * * * *", tz=...)`` functions, run inside the leading runner:
  key ``cron:<name>`` (see ``crons``).

One schedule per name across the first two: DatabaseScheduler mirrors each ``beat_schedule``
entry into a ``PeriodicTask`` row of the same name, and where such a row exists the row is
the schedule (the entry's beat options still apply to it), as under DatabaseScheduler; the
leading beat writes the entries into their rows when it starts leading (``mirror``), as
DatabaseScheduler does when it starts. An entry that is itself a problem stays flagged
under its own key.

A row that cannot be turned into ticks is still returned, with ``problem`` set (see
``schedule``). Nothing here touches the broker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from django.apps import apps
from django.conf import settings as django_settings
from django.utils.module_loading import autodiscover_modules

from cluster_singletons.beat import crons, periodic_tasks, timetables
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.timetables import Cron, Every, Once, Solar, Timetable
from cluster_singletons.errors import ScheduleInvalid, describe
from cluster_singletons.models import SCHEDULE_KEY_MAX
from cluster_singletons.names import OVERLAPS

logger = logging.getLogger("cluster_singletons.schedules")

#: Options of a ``beat_schedule`` entry that belong to the beat, not to ``send_task``.
BEAT_OPTIONS = ("skip_if_older_than", "overlap", "calculate_next_run_from_previous")
#: The header naming the ``PeriodicTask`` a message was sent for (django-celery-results
#: stores it).
PERIODIC_TASK_NAME = "periodic_task_name"
#: The headers Celery's beat gives every message it sends.
BEAT_HEADERS = {"celery_beat_task": True}
BACKEND_CLEANUP = "celery.backend_cleanup"
#: Warnings given once per process.
_SAID: set[str] = set()
_PERIODS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1, "microseconds": 1e-6}


# -- @cron -------------------------------------------------------------------------------


# -- loading -----------------------------------------------------------------------------


def load_all(
    app: Any, *, using: str, previous: Mapping[str, Schedule] | None = None
) -> dict[str, Schedule]:
    """Every schedule of every source, by key; task names are checked against ``app``.

    A ``PeriodicTask`` whose row is unchanged since ``previous`` comes back as the very
    same object, so rereading many schedules costs little more than reading their rows."""
    import_task_modules(app)
    found: dict[str, Schedule] = {s.key: s for s in crons.registered()}
    entries = beat_entries(app)
    found.update(from_beat_schedule(entries, tz=app.conf.timezone))
    if apps.is_installed("django_celery_beat"):
        found.update(from_periodic_tasks(using=using, previous=previous or {}))
        _one_per_name(found, entries)
    known = set(app.tasks.keys())
    for key, schedule in found.items():
        if len(key) > SCHEDULE_KEY_MAX:
            found[key] = replace(
                schedule,
                timetable=None,
                problem=f"its key is {len(key)} characters, more than {SCHEDULE_KEY_MAX}",
                source_row=(),
            )
            continue
        if schedule.task and not schedule.problem and schedule.task not in known:
            # Not reused by the next read (no source row): once the task exists it runs.
            found[key] = replace(
                schedule, timetable=None, problem=f"unknown task {schedule.task!r}", source_row=()
            )
    return found


def _one_per_name(found: dict[str, Schedule], entries: Mapping[str, Any]) -> None:
    """A ``beat_schedule`` entry whose name has a ``PeriodicTask`` row is that row: the
    entry's own key goes, its beat options (which have no column) go onto the row."""
    for name in entries:
        row, entry = found.get(f"periodic:{name}"), found.get(f"beat:{name}")
        if row is None or entry is None or entry.problem:
            continue
        del found[entry.key]
        carried = (entry.skip_if_older_than, entry.overlap, entry.from_previous)
        if (row.skip_if_older_than, row.overlap, row.from_previous) != carried:
            found[row.key] = replace(
                row,
                skip_if_older_than=entry.skip_if_older_than,
                overlap=entry.overlap,
                from_previous=entry.from_previous,
            )


def beat_entries(app: Any) -> dict[str, Any]:
    """Celery's ``beat_schedule`` and the default entry Celery's beat installs
    (``install_default_entries``): ``celery.backend_cleanup`` daily at 04:00, its message
    expiring after 12 h, when a result backend that does not expire results itself and
    ``result_expires`` are set (Celery's beat also sends it with no result backend, where
    it does nothing; this beat does not)."""
    entries = dict(app.conf.beat_schedule or {})
    if BACKEND_CLEANUP not in entries and _cleans_up_results(app):
        entries[BACKEND_CLEANUP] = _cleanup_entry(expires=12 * 3600)
    return entries


def _cleanup_entry(**options: Any) -> dict[str, Any]:
    """The default ``celery.backend_cleanup`` entry: Celery's beat gives its message
    ``expires``, DatabaseScheduler's row ``expire_seconds`` (the same 12 h)."""
    from celery.schedules import crontab

    return {"task": BACKEND_CLEANUP, "schedule": crontab("0", "4", "*"), "options": options}


def _cleans_up_results(app: Any) -> bool:
    backend = app.backend_cls or app.conf.result_backend
    if not app.conf.result_expires or not backend:
        return False
    from celery.app import backends
    from celery.backends.base import DisabledBackend

    try:
        found: Any = backends.by_url(backend, app.loader)  # (class, url): untyped stubs
        cls = found[0]
    except Exception as exc:  # the workers fail on it too; the beat says so once, goes on
        text = f"result backend {backend!r} cannot be loaded ({describe(exc)})"
        if text not in _SAID:
            _SAID.add(text)
            logger.warning("%s: no celery.backend_cleanup schedule", text)
        return False
    return not issubclass(cls, DisabledBackend) and not cls.supports_autoexpire


def mirror(app: Any, *, using: str) -> list[str]:
    """Write the ``beat_schedule`` entries into the ``PeriodicTask`` rows of their names
    that exist, with DatabaseScheduler's default entry first, as DatabaseScheduler does
    when it starts; the names written (none without django-celery-beat)."""
    if not apps.is_installed("django_celery_beat"):
        return []
    entries: dict[str, Any] = {}
    if app.conf.result_expires:  # DatabaseScheduler.install_default_entries
        entries[BACKEND_CLEANUP] = _cleanup_entry(expire_seconds=12 * 3600)
    entries.update(app.conf.beat_schedule or {})
    return periodic_tasks.mirror(entries, using=using)


_IMPORTED: set[int] = set()


def import_task_modules(app: Any) -> None:
    """Import the task modules a Celery worker or ``celery beat`` imports when it starts,
    once per app: Celery's ``imports`` and ``include``, and every installed app's
    ``tasks`` module (what ``app.autodiscover_tasks()`` finds). ``runcluster`` and the
    operator commands have no such start, and without it a task defined only in an app's
    ``tasks.py`` is unknown there. (Not through the loader's ``import_modules`` signal: in a
    Django project that sets Django up again, which resets the loggers' handlers.)"""
    if id(app) in _IMPORTED:
        return
    _IMPORTED.add(id(app))
    for module in app.loader.default_modules:
        app.loader.import_task_module(module)
    autodiscover_modules("tasks")


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
        options["headers"] = {**dict(options.get("headers") or {}), **BEAT_HEADERS}
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
        except Exception as exc:  # any value this code did not foresee: this entry only
            found[key] = replace(base, problem=describe(exc))
    return found


def _celery_timetable(value: Any, tz: str | None) -> Timetable:
    from celery.schedules import crontab, schedule, solar

    if isinstance(value, int | float):
        return Every(float(value))
    if isinstance(value, timedelta):
        return Every(value.total_seconds())
    if isinstance(value, crontab):
        expression = " ".join(
            _cron_field(getattr(value, f"_orig_{part}"))
            for part in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        )
        return Cron(expression, timetables.zone(tz))
    if isinstance(value, solar):
        return Solar(value.event, float(value.lat), float(value.lon))
    if isinstance(value, schedule):
        every: timedelta = getattr(value, "run_every")  # noqa: B009 (untyped in the stubs)
        return Every(every.total_seconds())
    raise ScheduleInvalid(f"unsupported schedule {value!r}")


def _cron_field(value: Any) -> str:
    """One field of a Celery ``crontab`` as cron text: a list or set of values (which Celery
    accepts) becomes a comma-separated list."""
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in sorted(value))
    return str(value)


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


def from_periodic_tasks(
    *, using: str, previous: Mapping[str, Schedule] | None = None
) -> dict[str, Schedule]:
    """django-celery-beat's ``PeriodicTask`` rows, read in one query (no model instances);
    rows unchanged since ``previous`` (``last_run_at`` aside) reuse its objects."""
    previous = previous or {}
    found = {}
    rows, unreadable = periodic_tasks.rows(using=using)
    for name, problem in unreadable.items():
        key = f"periodic:{name}"
        found[key] = Schedule(key=key, source="periodic", timetable=None, problem=problem)
    for row in rows:
        key = f"periodic:{row[0]}"
        before = previous.get(key)
        if before is not None and before.source_row == row[:-1]:
            found[key] = before
        else:
            found[key] = _periodic(dict(zip(periodic_tasks.FIELDS, row, strict=True)), row[:-1])
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
        options["headers"] = {**headers, PERIODIC_TASK_NAME: row["name"], **BEAT_HEADERS}
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
    except Exception as exc:  # any value this code did not foresee: this row only
        return Schedule(**identity, timetable=None, problem=describe(exc))


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
        tz = row["crontab_zone"]
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
