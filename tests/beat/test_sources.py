"""Where schedules come from: Celery's ``beat_schedule``, django-celery-beat's rows (against
the real test database) and ``@cron`` functions, each turned into a ``Schedule``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery import Celery
from celery.schedules import crontab, schedule
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
)

from cluster_singletons.beat import crons
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.sources import (
    BEAT_HEADERS,
    from_beat_schedule,
    from_periodic_tasks,
    load_all,
)
from cluster_singletons.beat.timetables import UNIX_EPOCH, Cron, Every, Once
from project.demo.localcluster import ROOT, database_url

T0 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)
#: A winter day: Europe/Berlin is UTC+1.
WINTER = datetime(2026, 1, 10, 0, 0, tzinfo=UTC)


def _one(entry: dict[str, Any], *, tz: str | None = None, name: str = "job") -> Schedule:
    found = from_beat_schedule({name: entry}, tz=tz)
    assert list(found) == [f"beat:{name}"]
    return found[f"beat:{name}"]


# -- beat_schedule -----------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (10, 10.0),
        (2.5, 2.5),
        (timedelta(minutes=5), 300.0),
        (timedelta(days=1, seconds=1), 86401.0),
        (schedule(timedelta(seconds=45)), 45.0),
        (schedule(run_every=90), 90.0),
    ],
    ids=["int", "float", "timedelta", "timedelta-days", "schedule", "schedule-number"],
)
def test_numbers_timedeltas_and_celery_schedules_are_intervals_on_the_epoch_grid(
    value: Any, seconds: float
) -> None:
    found = _one({"task": "t.tick", "schedule": value})
    assert found.problem == ""
    assert found.timetable == Every(seconds, UNIX_EPOCH)


@pytest.mark.unit
def test_a_beat_entry_keeps_its_task_args_kwargs_and_send_options() -> None:
    found = _one(
        {
            "task": "t.tick",
            "schedule": 10,
            "args": ["a", 1],
            "kwargs": {"k": "v"},
            "options": {"queue": "q", "priority": 3},
        },
        name="report",
    )
    assert (found.key, found.source, found.name, found.task) == (
        "beat:report",
        "beat",
        "report",
        "t.tick",
    )
    assert found.args == ("a", 1)
    assert found.kwargs == {"k": "v"}
    assert found.options == {"queue": "q", "priority": 3, "headers": BEAT_HEADERS}
    assert found.fn is None
    assert (found.skip_if_older_than, found.overlap, found.from_previous) == (None, None, False)


@pytest.mark.unit
def test_a_crontab_is_read_in_the_given_time_zone() -> None:
    entry = {"task": "t.tick", "schedule": crontab(minute=30, hour=2)}
    berlin = _one(entry, tz="Europe/Berlin")
    assert berlin.timetable == Cron("30 2 * * *", ZoneInfo("Europe/Berlin"))
    assert berlin.timetable.next_after(WINTER) == datetime(2026, 1, 10, 1, 30, tzinfo=UTC)
    utc = _one(entry, tz=None)
    assert utc.timetable == Cron("30 2 * * *", UTC)
    assert utc.timetable.next_after(WINTER) == datetime(2026, 1, 10, 2, 30, tzinfo=UTC)


@pytest.mark.unit
def test_a_crontab_keeps_all_five_fields_in_cron_order() -> None:
    value = crontab(
        minute="*/15", hour="9-17", day_of_month="1-7", month_of_year="*/3", day_of_week="mon-fri"
    )
    found = _one({"task": "t.tick", "schedule": value}, tz="UTC")
    assert found.timetable == Cron("*/15 9-17 1-7 */3 mon-fri", UTC)


@pytest.mark.unit
def test_a_crontab_with_a_list_of_minutes_is_scheduled_like_celery_does() -> None:
    found = _one({"task": "t.tick", "schedule": crontab(minute=[0, 30])}, tz="UTC")
    assert found.problem == ""
    assert found.timetable is not None
    assert found.timetable.next_after(WINTER) == WINTER + timedelta(minutes=30)


@pytest.mark.unit
def test_beat_options_are_popped_out_of_the_send_options() -> None:
    options = {
        "queue": "q",
        "skip_if_older_than": "600",
        "overlap": "buffer_one",
        "calculate_next_run_from_previous": 1,
    }
    entry = {"task": "t.tick", "schedule": 10, "options": options}
    found = _one(entry)
    assert found.problem == ""
    assert found.options == {"queue": "q", "headers": BEAT_HEADERS}, "only send_task's are left"
    assert found.skip_if_older_than == 600.0
    assert found.overlap == "buffer_one"
    assert found.from_previous is True
    assert set(entry["options"]) == set(options) and len(options) == 4, "input not mutated"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("entry", "tz", "problem"),
    [
        (
            {"schedule": 10, "options": {"overlap": "sometimes"}},
            None,
            "overlap must be one of ('skip', 'buffer_one', 'allow_all'), not 'sometimes'",
        ),
        (
            {"schedule": 10, "options": {"skip_if_older_than": "soon"}},
            None,
            "skip_if_older_than must be seconds",
        ),
        (
            {"schedule": 10, "options": {"skip_if_older_than": None}},
            None,
            "skip_if_older_than must be seconds",
        ),
        ({"schedule": "every day"}, None, "unsupported schedule 'every day'"),
        ({}, None, "unsupported schedule None"),
        ({"schedule": 0}, None, "interval must be a positive number of seconds"),
        ({"schedule": crontab(minute=0)}, "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ],
    ids=[
        "bad-overlap",
        "bad-skip",
        "none-skip",
        "unsupported",
        "missing",
        "zero",
        "bad-zone",
    ],
)
def test_a_bad_beat_entry_is_returned_with_a_problem_and_no_timetable(
    entry: dict[str, Any], tz: str | None, problem: str
) -> None:
    entries = {
        "bad": {"task": "t.tick", "args": [1], **entry},
        "good": {"task": "t.tick", "schedule": 10},
    }
    found = from_beat_schedule(entries, tz=tz)
    assert set(found) == {"beat:bad", "beat:good"}
    bad = found["beat:bad"]
    assert bad.timetable is None
    assert problem in bad.problem
    assert (bad.task, bad.args) == ("t.tick", (1,)), "the entry itself is kept"
    assert bad.first_tick_after(T0) is None
    good = found["beat:good"]
    assert (good.problem, good.timetable) == ("", Every(10.0))


# -- PeriodicTask rows -------------------------------------------------------------------


def _periodic(name: str, **fields: Any) -> PeriodicTask:
    fields.setdefault("task", "t.tick")
    return PeriodicTask.objects.create(name=name, **fields)


def _every(every: int = 10, period: str = IntervalSchedule.SECONDS) -> IntervalSchedule:
    return IntervalSchedule.objects.create(every=every, period=period)


def _rows() -> dict[str, Schedule]:
    return from_periodic_tasks(using="default")


@pytest.mark.db
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("every", "period", "seconds"),
    [
        (90, IntervalSchedule.SECONDS, 90.0),
        (2, IntervalSchedule.MINUTES, 120.0),
        (3, IntervalSchedule.HOURS, 10800.0),
        (1, IntervalSchedule.DAYS, 86400.0),
    ],
)
def test_an_interval_row_is_an_interval_in_seconds(every: int, period: str, seconds: float) -> None:
    _periodic("ival", interval=_every(every, period))
    found = _rows()["periodic:ival"]
    assert found.problem == ""
    assert found.timetable == Every(seconds, UNIX_EPOCH)


@pytest.mark.db
@pytest.mark.django_db
def test_an_interval_row_is_anchored_at_its_start_time() -> None:
    start = T0 + timedelta(seconds=7)
    _periodic("ival", interval=_every(10), start_time=start)
    found = _rows()["periodic:ival"]
    assert found.timetable == Every(10.0, start)
    assert found.start_time == start
    assert found.first_tick_after(T0) == start
    assert found.first_tick_after(start) == start + timedelta(seconds=10)


@pytest.mark.db
@pytest.mark.django_db
def test_a_crontab_row_runs_in_its_own_time_zone() -> None:
    berlin = CrontabSchedule.objects.create(minute="30", hour="2", timezone="Europe/Berlin")
    utc = CrontabSchedule.objects.create(minute="30", hour="2", timezone="UTC")
    _periodic("berlin", crontab=berlin)
    _periodic("utc", crontab=utc)
    found = _rows()
    assert found["periodic:berlin"].timetable == Cron("30 2 * * *", ZoneInfo("Europe/Berlin"))
    assert found["periodic:berlin"].first_tick_after(WINTER) == datetime(
        2026, 1, 10, 1, 30, tzinfo=UTC
    )
    assert found["periodic:utc"].first_tick_after(WINTER) == datetime(
        2026, 1, 10, 2, 30, tzinfo=UTC
    )


@pytest.mark.db
@pytest.mark.django_db
def test_a_clocked_row_runs_once_at_its_time() -> None:
    at = T0 + timedelta(seconds=25)
    _periodic("once", clocked=ClockedSchedule.objects.create(clocked_time=at), one_off=True)
    found = _rows()["periodic:once"]
    assert found.problem == ""
    assert found.timetable == Once(at)
    assert found.one_off is True
    assert found.first_tick_after(T0) == at
    assert found.first_tick_after(at) is None


@pytest.mark.db
@pytest.mark.django_db
def test_queue_routing_priority_headers_and_expiry_become_send_options() -> None:
    _periodic(
        "routed",
        interval=_every(),
        args='["a", 2]',
        kwargs='{"k": [1]}',
        queue="reports",
        exchange="ex",
        routing_key="reports.daily",
        priority=7,
        headers='{"h": "v"}',
        expire_seconds=30,
        enabled=False,
    )
    _periodic("plain", interval=_every(), expires=T0 + timedelta(days=1))
    found = _rows()
    routed = found["periodic:routed"]
    assert routed.problem == ""
    assert routed.options == {
        "queue": "reports",
        "exchange": "ex",
        "routing_key": "reports.daily",
        "priority": 7,
        "headers": {"h": "v", "periodic_task_name": "routed", **BEAT_HEADERS},
        "expires": 30,
    }
    assert routed.args == ("a", 2)
    assert routed.kwargs == {"k": [1]}
    assert routed.enabled is False
    assert routed.changed_at is not None and routed.changed_at.tzinfo is not None
    plain = found["periodic:plain"]
    assert plain.options == {"headers": {"periodic_task_name": "plain", **BEAT_HEADERS}}, (
        "unset columns send nothing; expires is the schedule's own"
    )
    assert plain.expires == T0 + timedelta(days=1)
    assert plain.first_tick_after(T0 + timedelta(days=1)) is None
    assert (plain.args, plain.kwargs) == ((), {})


@pytest.mark.db
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"args": "[not json"}, "args is not valid JSON"),
        ({"args": '{"a": 1}'}, "args must be a JSON list, not dict"),
        ({"kwargs": "{oops"}, "kwargs is not valid JSON"),
        ({"kwargs": "[1, 2]"}, "kwargs must be a JSON dict, not list"),
        ({"headers": "nope"}, "headers is not valid JSON"),
    ],
    ids=["args-json", "args-kind", "kwargs-json", "kwargs-kind", "headers-json"],
)
def test_bad_json_in_a_row_is_a_problem_and_the_row_is_still_returned(
    fields: dict[str, Any], problem: str
) -> None:
    _periodic("bad", interval=_every(), **fields)
    _periodic("good", interval=_every())
    found = _rows()
    bad = found["periodic:bad"]
    assert bad.problem.startswith(problem)
    assert bad.timetable is None
    assert (bad.key, bad.source, bad.task, bad.enabled) == (
        "periodic:bad",
        "periodic",
        "t.tick",
        True,
    )
    assert found["periodic:good"].problem == ""


@pytest.mark.db
@pytest.mark.django_db
def test_an_unknown_interval_period_is_a_problem() -> None:
    _periodic("odd", interval=_every(2, "fortnights"))
    found = _rows()["periodic:odd"]
    assert found.timetable is None
    assert found.problem == "unknown interval period 'fortnights'"


@pytest.mark.db
@pytest.mark.django_db
def test_a_row_whose_schedule_was_removed_is_a_problem() -> None:
    _periodic("orphan", interval=_every())
    PeriodicTask.objects.filter(name="orphan").update(interval=None)  # bypasses validation
    found = _rows()["periodic:orphan"]
    assert found.timetable is None
    assert found.problem == "no schedule (interval, crontab, clocked or solar) is set"


@pytest.mark.db
@pytest.mark.django_db
def test_an_unchanged_periodic_row_is_reused_not_rebuilt() -> None:
    _periodic("same", interval=_every())
    _periodic("edited", interval=_every(), kwargs='{"v": 1}')
    first = _rows()
    # Only the beat's own bookkeeping changes on "same": still the same schedule.
    PeriodicTask.objects.filter(name="same").update(last_run_at=T0)
    # A bulk update leaves date_changed alone; the column itself decides.
    PeriodicTask.objects.filter(name="edited").update(kwargs='{"v": 2}')
    second = from_periodic_tasks(using="default", previous=first)
    assert second["periodic:same"] is first["periodic:same"]
    assert second["periodic:edited"] is not first["periodic:edited"]
    assert second["periodic:edited"].kwargs == {"v": 2}
    rebuilt = from_periodic_tasks(using="default", previous={})
    assert rebuilt["periodic:same"] is not first["periodic:same"]
    assert rebuilt["periodic:same"] == first["periodic:same"]


@pytest.mark.db
@pytest.mark.django_db
def test_a_deleted_row_is_gone_from_the_next_read() -> None:
    _periodic("stays", interval=_every())
    _periodic("goes", interval=_every())
    first = _rows()
    PeriodicTask.objects.filter(name="goes").delete()
    second = from_periodic_tasks(using="default", previous=first)
    assert set(second) == {"periodic:stays"}


# -- load_all ----------------------------------------------------------------------------


@pytest.fixture
def app() -> Celery:
    app = Celery("sources-test", broker="memory://", set_as_current=False)

    @app.task(name="t.tick", shared=False)
    def tick(*args: Any, **kwargs: Any) -> None:
        """A task the schedules name; never run."""

    return app


def _cron_job(run: Any) -> None:
    """An in-runner ``@cron`` function; never run here."""


@pytest.fixture
def registered_cron() -> Iterator[str]:
    crons.cron("t-sources", "*/5 * * * *", tz="Europe/Berlin", overlap="skip")(_cron_job)
    try:
        yield "cron:t-sources"
    finally:
        crons._crons.pop("cron:t-sources", None)


@pytest.mark.db
@pytest.mark.django_db
def test_load_all_flags_an_unknown_task_name_as_a_problem(app: Celery) -> None:
    app.conf.beat_schedule = {
        "known": {"task": "t.tick", "schedule": 10},
        "ghost": {"task": "no.such.task", "schedule": 10},
        "both": {"task": "no.such.task", "schedule": 10, "options": {"overlap": "bad"}},
    }
    _periodic("ghost-row", interval=_every(), task="no.such.periodic")
    _periodic("known-row", interval=_every())
    found = load_all(app, using="default")
    for key, task in (("beat:ghost", "no.such.task"), ("periodic:ghost-row", "no.such.periodic")):
        assert found[key].problem == f"unknown task {task!r}"
        assert found[key].timetable is None
    assert found["beat:known"].problem == "" and found["beat:known"].timetable is not None
    assert found["periodic:known-row"].problem == ""
    assert found["beat:both"].problem.startswith("overlap must be one of"), "first problem kept"


@pytest.mark.db
@pytest.mark.django_db
def test_load_all_includes_cron_functions_beside_the_other_sources(
    app: Celery, registered_cron: str
) -> None:
    app.conf.timezone = "Europe/Berlin"
    app.conf.beat_schedule = {"night": {"task": "t.tick", "schedule": crontab(minute=0, hour=3)}}
    _periodic("ival", interval=_every())
    found = load_all(app, using="default")
    assert {registered_cron, "beat:night", "periodic:ival"} <= set(found)
    cron = found[registered_cron]
    assert (cron.source, cron.fn, cron.task, cron.problem) == ("cron", _cron_job, "", "")
    assert cron.overlap == "skip"
    assert cron.timetable == Cron("*/5 * * * *", ZoneInfo("Europe/Berlin"))
    assert found["beat:night"].timetable == Cron("0 3 * * *", ZoneInfo("Europe/Berlin"))


@pytest.mark.db
@pytest.mark.django_db
def test_load_all_reuses_unchanged_periodic_rows_from_previous(app: Celery) -> None:
    _periodic("ival", interval=_every())
    first = load_all(app, using="default")
    second = load_all(app, using="default", previous=first)
    assert second["periodic:ival"] is first["periodic:ival"]


@pytest.mark.db
@pytest.mark.django_db
def test_a_row_flagged_for_an_unknown_task_recovers_once_the_task_is_registered(
    app: Celery,
) -> None:
    _periodic("later", interval=_every(), task="t.later")
    first = load_all(app, using="default")
    assert first["periodic:later"].problem == "unknown task 't.later'"

    @app.task(name="t.later", shared=False)
    def later() -> None:
        """Registered after the first load (a lazily imported tasks module)."""

    second = load_all(app, using="default", previous=first)
    assert second["periodic:later"].problem == ""
    assert second["periodic:later"].timetable == Every(10.0)


@pytest.mark.django_db(transaction=True)
def test_tasks_only_autodiscovery_registers_are_known_and_a_typo_is_still_unknown() -> None:
    """``runcluster`` and the commands have no worker start to import the task modules
    Celery autodiscovers: loading schedules imports them, in a fresh interpreter here."""
    code = (
        "import django; django.setup()\n"
        "from project.celery import app\n"
        "from cluster_singletons.beat.sources import load_all\n"
        "app.conf.beat_schedule = {\n"
        "    'report': {'task': 'reports.send_report', 'schedule': 5.0},\n"
        "    'typo': {'task': 'reports.send_reprot', 'schedule': 5.0},\n"
        "}\n"
        "found = load_all(app, using='default')\n"
        "print(repr(found['beat:report'].problem))\n"
        "print(found['beat:typo'].problem)\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": database_url(),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report, typo = done.stdout.splitlines()
    assert report == "''"
    assert typo.startswith("unknown task 'reports.send_reprot'")
