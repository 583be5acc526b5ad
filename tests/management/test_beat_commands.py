"""Operator commands on schedules: preview, run now, pause, backfill, prune."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from celery import Celery
from django.core.management import CommandError, call_command
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons import control
from cluster_singletons.beat import crons
from cluster_singletons.models import Run, ScheduleRecord
from tests.beat.test_engine import T0, Leader, _drain, app  # noqa: F401 (fixture)

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _call(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def hourly() -> PeriodicTask:
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.HOURS)
    return PeriodicTask.objects.create(
        name="hourly", task="demo.ping", interval=every, start_time=T0, queue="beat-test"
    )


def test_cron_preview_of_an_expression_in_a_zone() -> None:
    out = _call("cron_preview", "30 2 * * *", "-n", "3", "--tz", "Europe/Berlin").splitlines()
    assert out[0] == "30 2 * * *: At 02:30 AM (Europe/Berlin)"
    assert len(out) == 4
    assert all(line.endswith(("+01:00", "+02:00")) and "T02:30:00" in line for line in out[1:])


@pytest.mark.usefixtures("hourly")
def test_cron_preview_of_a_schedule_and_the_list() -> None:
    out = _call("cron_preview", "hourly", "-n", "2").splitlines()
    assert out[0] == "periodic:hourly: Every hour"
    assert len(out) == 3
    assert "periodic:hourly\tdemo.ping\tEvery hour" in _call("cron_preview", "--list")


def test_unknown_names_and_bad_input_exit_with_clear_errors() -> None:
    with pytest.raises(CommandError, match="no schedule named 'nope'") as unknown:
        call_command("cron_preview", "nope")
    assert unknown.value.returncode == 2
    with pytest.raises(CommandError, match="invalid cron expression"):
        call_command("cron_preview", "61 * * * *")
    with pytest.raises(CommandError, match="not a duration"):
        call_command("cluster_prune", "--older-than", "soon")
    with pytest.raises(CommandError, match="ISO 8601"):
        call_command("cluster_backfill", "x", "--start", "yesterday", "--end", "now")


def test_backfill_runs_each_missing_tick_once(app: Celery, hourly: PeriodicTask) -> None:  # noqa: F811
    # Ticks 01:00 and 02:00 ran; 03:00 and 04:00 were skipped (coalesced in one row).
    Run.objects.create(schedule="periodic:hourly", tick=T0 + timedelta(hours=1), status="succeeded")
    Run.objects.create(schedule="periodic:hourly", tick=T0 + timedelta(hours=2), status="published")
    Run.objects.create(
        schedule="periodic:hourly",
        tick=T0 + timedelta(hours=4),
        first_tick=T0 + timedelta(hours=3),
        ticks=2,
        status="skipped",
    )
    start, end = (T0 + timedelta(hours=1)).isoformat(), (T0 + timedelta(hours=5)).isoformat()
    out = _call("cluster_backfill", "hourly", "--start", start, "--end", end)
    assert out.strip() == "3 tick(s) recorded for dispatch, 2 already ran"
    again = _call("cluster_backfill", "hourly", "--start", start, "--end", end)
    assert again.strip() == "0 tick(s) recorded for dispatch, 5 already ran"
    leader = Leader(app, wall=T0 + timedelta(days=1))  # the leader publishes what is pending
    del leader
    ticks = sorted(h["cluster_context"]["tick"] for h in _drain(app))
    assert ticks == [(T0 + timedelta(hours=h)).isoformat() for h in (3, 4, 5)]


def test_run_now_pause_and_resume(app: Celery, hourly: PeriodicTask) -> None:  # noqa: F811
    out = _call("cluster_schedule", "run", "hourly", "--note", "by hand")
    assert out.startswith("recorded manual run")
    run = Run.objects.get(kind=Run.Kind.MANUAL)
    assert run.reason == "by hand"
    Leader(app, wall=datetime.now(UTC))
    assert [h["id"] for h in _drain(app)] == [run.task_id]
    with pytest.raises(CommandError, match="--note"):
        call_command("cluster_schedule", "pause", "hourly")
    _call("cluster_schedule", "pause", "hourly", "--note", "vendor outage")
    record = ScheduleRecord.objects.get(key="periodic:hourly")
    assert (record.paused, record.pause_note) == (True, "vendor outage")
    _call("cluster_schedule", "resume", "periodic:hourly")
    assert not ScheduleRecord.objects.get(key="periodic:hourly").paused


def test_prune_keeps_unpublished_intents(settings: Any) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    for i, status in enumerate(["succeeded", "skipped", "pending"]):
        Run.objects.create(schedule="beat:s", tick=old + timedelta(seconds=i), status=status)
    Run.objects.update(created_at=old)
    Run.objects.create(schedule="beat:s", tick=datetime.now(UTC), status="succeeded")
    assert _call("cluster_prune", "--older-than", "30d").strip() == "deleted 2 ledger row(s)"
    assert sorted(Run.objects.values_list("status", flat=True)) == ["pending", "succeeded"]
    assert control.parse_duration("2w") == 14 * 86400


@pytest.mark.usefixtures("hourly")
def test_out_of_range_input_is_a_one_line_error_not_a_traceback() -> None:
    with pytest.raises(CommandError, match="more than the calendar holds"):
        call_command("cluster_prune", "--older-than", "99999999999d")
    with pytest.raises(CommandError, match="past the calendar's end"):
        call_command(
            "cluster_backfill", "hourly", "--start", "9999-12-31T22:30", "--end", "9999-12-31T23:59"
        )


@pytest.mark.usefixtures("hourly")
def test_an_unknown_schedule_name_lists_the_known_ones() -> None:
    with pytest.raises(CommandError, match=r"no schedule named 'nope'; known: .*periodic:hourly"):
        call_command("cluster_schedule", "run", "nope")


def test_cron_preview_of_a_zoned_schedule_shows_its_zone_s_times() -> None:
    saved = dict(crons._crons)
    try:

        @crons.cron("berlin-nightly", "0 3 * * *", tz="Europe/Berlin")
        def nightly(run: Any) -> None: ...

        times = _call("cron_preview", "berlin-nightly", "-n", "3").splitlines()[1:]
        assert times and all("T03:00:00" in t and t.endswith(("+01:00", "+02:00")) for t in times)
        in_utc = _call("cron_preview", "berlin-nightly", "-n", "1", "--tz", "UTC").splitlines()
        assert in_utc[1].endswith("+00:00") and "T03:00:00" not in in_utc[1]
    finally:
        crons._crons.clear()
        crons._crons.update(saved)
