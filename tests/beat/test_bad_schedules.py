"""A schedule a user got wrong is flagged while every other schedule keeps running.

Each test here reproduces a row or an edit that used to stop, mislead or multiply the
beat; the engine runs on a frozen clock against the real database and a real (in-memory)
broker, as in ``test_engine``.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.db import connection
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from cluster_singletons.beat import crons, engine, refresh
from cluster_singletons.beat.refresh import Seen
from cluster_singletons.errors import SingletonConfigError
from cluster_singletons.models import Run, ScheduleRecord
from project.demo.localcluster import poll
from tests.beat.test_engine import T0, Leader, _drain

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _good() -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="good", task="t.tick", interval=every, start_time=T0)


def _dispatched(app: Celery) -> list[str]:
    return [h["cluster_context"]["schedule"] for h in _drain(app)]


def _errors() -> dict[str, str]:
    return dict(Run.objects.filter(status=Run.Status.ERROR).values_list("schedule", "reason"))


def _crontab(minute: str = "0", hour: str = "0", day: str = "30", month: str = "2") -> Any:
    return CrontabSchedule.objects.create(
        minute=minute, hour=hour, day_of_month=day, month_of_year=month
    )


def test_a_crontab_that_never_fires_is_flagged_and_the_rest_run(app: Celery) -> None:
    _good()
    PeriodicTask.objects.create(name="feb30", task="t.tick", crontab=_crontab())
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(10)
    leader.at(20)
    assert _dispatched(app) == ["periodic:good"] * 2
    assert "periodic:feb30" in _errors()
    assert ScheduleRecord.objects.get(key="periodic:feb30").problem


def test_an_interval_beyond_the_calendar_is_flagged_and_the_rest_run(app: Celery) -> None:
    _good()
    huge = IntervalSchedule.objects.create(every=5_000_000, period=IntervalSchedule.DAYS)
    PeriodicTask.objects.create(name="huge", task="t.tick", interval=huge, start_time=T0)
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(10)
    assert _dispatched(app) == ["periodic:good"]
    assert "periodic:huge" in _errors()


def test_a_crontab_whose_stored_zone_is_not_a_zone_is_flagged_and_the_rest_run(
    app: Celery,
) -> None:
    _good()
    cron = _crontab(minute="*", hour="*", day="*", month="*")
    PeriodicTask.objects.create(name="zone", task="t.tick", crontab=cron)
    with connection.cursor() as cursor:  # as SQL or an older version would have written it
        cursor.execute(
            f"UPDATE {CrontabSchedule._meta.db_table} SET timezone = %s WHERE id = %s",
            ["Mars/Olympus", cron.id],
        )
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(10)
    assert _dispatched(app) == ["periodic:good"]
    assert "Mars/Olympus" in _errors()["periodic:zone"]


def test_the_refresh_watcher_survives_any_error_and_says_so() -> None:
    calls: list[bool] = []
    seen = Seen(paused=frozenset(), signature=None, found=None)

    def look(full: bool = False) -> Seen:
        calls.append(full)
        if len(calls) <= 3:
            raise ValueError("a bad row")
        return seen

    watcher = refresh.Watcher(look, interval=0.01, using="default")
    watcher.start()
    try:
        poll("a look after the failures", lambda: watcher.take() is seen, timeout=5)
        assert watcher._thread.is_alive()
    finally:
        watcher.stop()
    assert len(calls) > 3


def test_a_watcher_that_cannot_look_turns_the_beat_red() -> None:
    def look(full: bool = False) -> Seen:
        raise ValueError("a bad row")

    watcher = refresh.Watcher(look, interval=0.01, using="default")
    watcher.start()
    try:
        poll("the watcher's problem", lambda: watcher.problem(stale_after=0.05), timeout=5)
        assert "a bad row" in (watcher.problem(stale_after=0.05) or "")
    finally:
        watcher.stop()


def test_edits_keep_one_heap_entry_and_never_plan_beyond_the_lookahead(app: Celery) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(name="edited", task="t.tick", interval=every)
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    for second in range(1, 61):
        if second % 10 == 5:  # an edit between two ticks
            task.args = f"[{second}]"
            task.save()  # date_changed is the real time; the test's clock is its own
            PeriodicTask.objects.filter(pk=task.pk).update(date_changed=leader.clock.now())
        leader.at(second)
        assert leader.engine.catalog.live_items("periodic:edited") == 1
        furthest = Run.objects.filter(schedule="periodic:edited").order_by("-tick").first()
        if furthest is not None:
            assert furthest.tick <= leader.clock.now() + timedelta(seconds=1)
    ticks = list(Run.objects.filter(schedule="periodic:edited").values_list("tick", flat=True))
    assert sorted(ticks) == [T0 + timedelta(seconds=s) for s in range(10, 61, 10)]


def test_sqlite_rereads_every_schedule_at_least_once_a_minute_under_the_watcher(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    if connection.vendor == "postgresql":
        pytest.skip("PostgreSQL sees every edit through its digest")
    monkeypatch.setattr(engine, "_FULL_REFRESH", 0.2)
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="bulk", task="t.tick", interval=every)
    leader = Leader(app)
    settings = leader.engine.settings.model_copy(update={"beat_refresh_interval": 0.05})
    beat = engine.BeatEngine(app, settings=settings)  # the real clock, as runcluster runs it
    runner = threading.Thread(target=beat.run, args=(leader.leadership,))
    runner.start()
    try:
        entries = beat.catalog.entries
        poll("the schedule", lambda: "periodic:bulk" in entries, timeout=5)
        PeriodicTask.objects.filter(name="bulk").update(enabled=False)  # no signal, no date
        poll("the bulk update", lambda: not entries["periodic:bulk"].schedule.enabled, timeout=5)
    finally:
        leader.stop.set()
        runner.join(10)


def test_an_operators_overlap_override_on_the_schedule_record_is_applied(app: Celery) -> None:
    app.conf.beat_schedule = {"x": {"task": "t.tick", "schedule": 10}}
    ScheduleRecord.objects.create(key="beat:x", overlap="skip")
    leader = Leader(app)  # the settings say allow_all
    leader.at(10)
    leader.at(20)  # the first run never finished
    assert _dispatched(app) == ["beat:x"]
    assert Run.objects.filter(schedule="beat:x", status=Run.Status.SKIPPED).count() == 1


def test_an_operators_catch_up_override_on_the_schedule_record_is_applied(app: Celery) -> None:
    app.conf.beat_schedule = {"x": {"task": "t.tick", "schedule": 60}}
    ScheduleRecord.objects.create(
        key="beat:x", last_tick=T0 - timedelta(hours=2), skip_if_older_than=600
    )
    Leader(app).at(0)
    skipped = Run.objects.get(schedule="beat:x", status=Run.Status.SKIPPED)
    assert skipped.ticks == 109


@pytest.mark.parametrize("value", [-100.0, 1e308, float("nan")])
def test_the_admin_refuses_an_absurd_catch_up_override(value: float) -> None:
    from django.core.exceptions import ValidationError

    record = ScheduleRecord(key="beat:x", skip_if_older_than=value)
    with pytest.raises(ValidationError):
        record.full_clean()


def test_a_cron_function_that_never_fires_is_refused_at_registration() -> None:
    with pytest.raises(SingletonConfigError, match="feb30"):
        crons.cron("feb30", "0 0 30 2 *")(lambda run: None)
    assert "cron:feb30" not in crons._crons


def test_a_problem_is_cleared_once_its_row_is_fixed_and_a_deleted_row_says_so(
    app: Celery,
) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(name="json", task="t.tick", interval=every, args="[bad")
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(1)
    assert ScheduleRecord.objects.get(key="periodic:json").problem.startswith("args")
    task.args = "[1]"
    task.save()
    leader.at(6)
    assert ScheduleRecord.objects.get(key="periodic:json").problem == ""
    task.delete()
    leader.at(12)
    assert "deleted" in ScheduleRecord.objects.get(key="periodic:json").problem


class _Broken:
    """A timetable whose next tick cannot be computed (as an expression that never fires
    was, before registration checked it)."""

    def next_after(self, after: Any) -> Any:
        raise ValueError("no next tick")

    def describe(self) -> str:
        return "broken"


def test_a_cron_whose_ticks_cannot_be_computed_is_failed_in_health_never_an_error_page(
    isolated_registry: None,
) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from cluster_singletons.beat.schedule import Schedule
    from cluster_singletons.cluster import heartbeats, leases, membership

    leases.ensure(["beat"], using="default")
    runner = membership.register(host="h", pid=1, kind="beat", using="default")
    leases.acquire("beat", runner, ttl=30, using="default")
    heartbeats.record("cron:broken", runner_id=runner, epoch=1, interval=0.0, using="default")
    broken = Schedule(key="cron:broken", source="cron", timetable=_Broken(), fn=lambda run: None)  # type: ignore[arg-type]
    crons._crons["cron:broken"] = broken
    try:
        ready = Client().get("/cluster/health/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "unhealthy"}
        staff = Client()
        staff.force_login(User.objects.create_superuser("ops"))
        (item,) = [
            c
            for c in staff.get("/cluster/health/ready").json()["checks"]
            if c["name"] == "cron:broken"
        ]
        assert item["status"] == "failed" and "no next tick" in item["last_error"]
        assert Client().get("/cluster/metrics").status_code == 200
        assert staff.get("/admin/cluster_singletons/clusterhealth/").status_code == 200
    finally:
        del crons._crons["cron:broken"]


def test_a_row_that_cannot_be_read_at_all_is_left_out_alone(app: Celery) -> None:
    if connection.vendor != "sqlite":
        pytest.skip("only SQLite stores text that its decimal column cannot convert")
    from django_celery_beat.models import SolarSchedule

    _good()
    solar = SolarSchedule.objects.create(event="sunrise", latitude=52.5, longitude=13.4)
    PeriodicTask.objects.create(name="garbled", task="t.tick", solar=solar)
    with connection.cursor() as cursor:  # its decimal column cannot be converted
        cursor.execute(f"UPDATE {SolarSchedule._meta.db_table} SET latitude = %s", ["north"])
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(10)
    assert _dispatched(app) == ["periodic:good"]
    assert "cannot be read" in _errors()["periodic:garbled"]


def test_an_exception_planning_one_schedule_flags_it_and_the_rest_run(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster_singletons.beat import planning

    app.conf.beat_schedule = {
        "fine": {"task": "t.tick", "schedule": 10},
        "cursed": {"task": "t.tick", "schedule": 10},
    }
    real = planning.plan

    def plan(entry: Any, *args: Any, **kwargs: Any) -> Any:
        if entry.schedule.key == "beat:cursed":
            raise RuntimeError("cursed")
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(planning, "plan", plan)
    leader = Leader(app)
    leader.at(10)
    leader.at(20)
    assert _dispatched(app) == ["beat:fine", "beat:fine"]
    assert "cursed" in _errors()["beat:cursed"]
    assert leader.engine.catalog.live_items("beat:cursed") == 0, "planned no more"


def test_each_problem_is_logged_once_not_at_every_reread(app: Celery) -> None:
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    beat_log = logging.getLogger("cluster_singletons.beat")
    beat_log.addHandler(handler)
    try:
        every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
        PeriodicTask.objects.create(name="json", task="t.tick", interval=every, args="[bad")
        app.conf.beat_schedule = {
            "never": {"task": "t.tick", "schedule": 10, "options": {"overlap": "x"}}
        }
        PeriodicTask.objects.update(date_changed=T0)
        leader = Leader(app)
        for second in range(0, 200, 5):  # several full rereads
            leader.at(second)
    finally:
        beat_log.removeHandler(handler)
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len([m for m in errors if "periodic:json" in m]) == 1
    assert len([m for m in errors if "beat:never" in m]) == 1


def test_a_watcher_that_cannot_look_turns_the_beats_health_failed(app: Celery) -> None:
    from cluster_singletons.health.report import cluster_health
    from cluster_singletons.health.status import FAILED

    class Stuck:
        def take(self) -> None:
            return None

        def problem(self, *, stale_after: float = 15.0) -> str:
            return f"the schedule watcher has not completed a look for {stale_after:g}s"

    leader = Leader(app)
    leader.engine._watcher = Stuck()  # type: ignore[assignment]
    leader.at(5)
    (beat,) = [i for i in cluster_health().items if i.name == "beat"]
    assert beat.status == FAILED and "watcher" in beat.last_error


def test_a_microsecond_interval_after_a_days_downtime_is_one_capped_run(app: Celery) -> None:
    from cluster_singletons.beat.planning import MAX_TICKS

    _good()
    tiny = IntervalSchedule.objects.create(every=2, period=IntervalSchedule.MICROSECONDS)
    PeriodicTask.objects.create(name="tiny", task="t.tick", interval=tiny, start_time=T0)
    PeriodicTask.objects.update(date_changed=T0)
    app.conf.beat_schedule = {}
    settings = Leader(app).engine.settings.model_copy(
        update={"overlap": "allow_all", "skip_if_older_than": 10**6}
    )
    leader = Leader(app, settings=settings)
    leader.at(86_400)  # a day later: 4.3e10 ticks of the tiny interval, coalesced
    run = Run.objects.filter(schedule="periodic:tiny").exclude(status=Run.Status.ERROR).get()
    assert run.ticks == MAX_TICKS
    leader.at(86_410)
    assert "periodic:good" in _dispatched(app)


def test_the_longest_periodic_names_run_and_a_key_too_long_to_store_is_flagged_alone(
    app: Celery,
) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    longest = "n" * 200  # django-celery-beat's limit: key periodic:nnn... is 209 characters
    PeriodicTask.objects.create(name=longest, task="t.tick", interval=every, start_time=T0)
    PeriodicTask.objects.update(date_changed=T0)
    app.conf.beat_schedule = {"b" * 300: {"task": "t.tick", "schedule": 10}}
    leader = Leader(app)
    leader.at(10)
    assert _dispatched(app) == [f"periodic:{longest}"]
    problem = leader.engine.catalog.schedules["beat:" + "b" * 300].problem
    assert "more than 255" in problem
