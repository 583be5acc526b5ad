"""The beat's warm standby: schedules kept loaded and cursors following the ledger while
another runner leads, so a takeover starts at once; and a pass that fails on the
database retried in place. Real database, real (in-memory kombu) broker."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from django.db import DatabaseError, connection
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons.beat import schedule_records
from cluster_singletons.beat.engine import BeatEngine
from cluster_singletons.beat.standby import Standby
from cluster_singletons.clock import FrozenClock, SystemClock
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.conf import get_settings
from cluster_singletons.models import Heartbeat, Lease, Run, Runner, ScheduleRecord
from project.demo.localcluster import poll
from tests.beat.test_engine import T0, Leader, _drain, _ticks

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _schedules(app: Celery) -> None:
    tick = "t.tick"
    app.conf.beat_schedule = {
        "three": {"task": tick, "schedule": 3.0, "args": ["three"]},
        "seven": {"task": tick, "schedule": 7.0, "args": ["seven"]},
        "minute": {"task": tick, "schedule": crontab(), "args": ["minute"]},
        "prev": {
            "task": tick,
            "schedule": 4.0,
            "options": {"calculate_next_run_from_previous": True},
        },
        # No worker reports a run finished here: after its first run, every tick is skipped.
        "skip": {"task": tick, "schedule": 2.0, "options": {"overlap": "skip"}},
        "buffer": {"task": tick, "schedule": 5.0, "options": {"overlap": "buffer_one"}},
    }


def _history(app: Celery, *, warm: bool) -> tuple[list[tuple[Any, ...]], list[str]]:
    """A leads for 40 s (one schedule paused for a while), dies with ticks recorded ahead;
    B takes over at 50 s, warm from a standby that followed A, or loading cold; B's term
    ends at 70 s and it leads again at 75 s (warm: from the schedules it handed back)."""
    _schedules(app)
    a = Leader(app)
    standby = Standby(app, settings=get_settings())
    for second in range(1, 41):
        if second == 12:
            schedule_records.set_paused("beat:seven", "maintenance", using="default")
        if second == 24:
            schedule_records.set_paused("beat:seven", None, using="default")
        a.at(second)
        if warm and second >= 5:
            standby.sync(a.clock)
    a.stop.set()  # dead: its ticks recorded ahead of 41 s stay pending
    loaded = standby.take() if warm else None
    assert (loaded is not None) == warm
    b = Leader(app, wall=T0 + timedelta(seconds=50), loaded=loaded)
    assert b.warm == warm
    for second in range(50, 70):
        b.at(second)
    # B's term ends; its standby takes the schedules back, and leads again from them at 75.
    b.stop.set()
    if warm:
        standby.give_back(b.engine.loaded, at=datetime.now(UTC))
        standby.sync(b.clock)
    c = Leader(app, wall=T0 + timedelta(seconds=75), loaded=standby.take() if warm else None)
    assert c.warm == warm
    for second in range(75, 100):
        c.at(second)
    rows = Run.objects.order_by("schedule", "tick")
    fields = ("schedule", "tick", "first_tick", "ticks", "status", "kind", "reason", "task_id")
    return list(rows.values_list(*fields)), _ticks(app)


def _forget_history(app: Celery) -> None:
    for model in (Run, ScheduleRecord, Heartbeat, Lease, Runner):
        model.objects.all().delete()
    _drain(app)


def test_a_warm_takeover_records_and_publishes_exactly_what_a_cold_one_does(app: Celery) -> None:
    warm_rows, warm_ticks = _history(app, warm=True)
    _forget_history(app)
    cold_rows, cold_ticks = _history(app, warm=False)
    assert warm_rows == cold_rows
    assert warm_ticks == cold_ticks
    # The history is not trivial: catch-up after the takeover, a pause passed through,
    # overlap skips, and a run from the previous run's time.
    statuses = {(row[0], row[4]) for row in cold_rows}
    assert ("beat:skip", "skipped") in statuses
    assert any(row[3] > 1 for row in cold_rows), "a coalesced run after the takeover"
    seven = [row[1] for row in cold_rows if row[0] == "beat:seven"]
    assert not [t for t in seven if T0 + timedelta(seconds=15) < t < T0 + timedelta(seconds=24)]


def test_the_standby_follows_edits_and_reloads_after_a_failed_term(app: Celery) -> None:
    _schedules(app)
    clock = FrozenClock(wall=T0)
    standby = Standby(app, settings=get_settings())
    standby.sync(clock)
    app.conf.beat_schedule = {
        **app.conf.beat_schedule,
        "new": {"task": "t.tick", "schedule": 1.0},
    }
    loaded = standby.take()
    assert loaded is not None and "beat:new" not in loaded.catalog.entries
    standby.sync(clock)  # leading: the standby does nothing
    standby.give_back(None, at=T0)  # the term failed: what the engine held is not trusted
    standby.sync(clock)
    again = standby.take()
    assert again is not None and again is not loaded
    assert "beat:new" in again.catalog.entries


def test_a_takeover_applies_edits_the_standby_has_not_seen_yet(app: Celery) -> None:
    _schedules(app)
    a = Leader(app)
    a.at(1)
    standby = Standby(app, settings=get_settings())
    standby.sync(a.clock)
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="new", task="t.tick", interval=every)
    PeriodicTask.objects.filter(name="new").update(date_changed=T0)  # made in the test's time
    a.stop.set()
    b = Leader(app, wall=T0 + timedelta(seconds=2), loaded=standby.take())
    assert b.warm
    b.at(4)
    assert Run.objects.filter(schedule="periodic:new").exists()


def test_a_pass_that_fails_on_the_database_is_retried_in_place(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger's table is away for a while (a real database error): the engine keeps
    its term and its schedules, and each tick of the outage goes out once when it is back."""
    app.conf.beat_schedule = {"fast": {"task": "t.tick", "schedule": 0.2}}
    leader = Leader(app)
    engine = BeatEngine(app, clock=SystemClock(), settings=leader.engine.settings)
    stop = threading.Event()
    leadership = Leadership(term=leader.leadership.term, stop_event=stop, using="default", ttl=30)
    thread = threading.Thread(target=engine.run, args=(leadership,))
    thread.start()
    try:
        poll("a run", lambda: Run.objects.filter(schedule="beat:fast").exists(), timeout=10)
        table = Run._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
        poll("a failed pass", lambda: "beat pass failed" in caplog.text, timeout=10)
        away_at = datetime.now().astimezone()
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
        poll(
            "runs after the outage",
            lambda: Run.objects.filter(tick__gt=away_at + timedelta(seconds=1)).exists(),
            timeout=10,
        )
        assert thread.is_alive(), "the term goes on, schedules kept (no restart, no reload)"
    finally:
        stop.set()
        thread.join(10)
    assert caplog.text.count("beat pass failed") == 1, "one line for the outage"
    assert "beat passes work again" in caplog.text
    # Every tick from the first to the last accounted for once: those of the outage were
    # planned again (coalesced), none lost, none twice.
    rows = list(
        Run.objects.filter(schedule="beat:fast")
        .order_by("tick")
        .values_list("first_tick", "tick", "ticks")
    )
    span = rows[-1][1] - (rows[0][0] or rows[0][1])
    assert sum(count for _, _, count in rows) == round(span.total_seconds() / 0.2) + 1
    for (_, previous, _), (first, tick, _) in itertools.pairwise(rows):
        assert (first or tick) - previous == timedelta(seconds=0.2)


def test_a_pass_whose_ledger_write_fails_leaves_the_cursors_as_they_were(app: Celery) -> None:
    app.conf.beat_schedule = {"one": {"task": "t.tick", "schedule": 1.0}}
    leader = Leader(app)
    leader.at(1)
    table = Run._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    with pytest.raises(DatabaseError):
        leader.at(3)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    leader.at(4)
    rows = Run.objects.order_by("tick").values_list("first_tick", "tick", "ticks")
    assert list(rows) == [
        (None, T0 + timedelta(seconds=1), 1),
        (T0 + timedelta(seconds=2), T0 + timedelta(seconds=4), 3),
    ]


def test_the_standby_waits_for_the_database_clock_without_an_error(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the runner's first renewal its database clock is unknown (it raises): the
    standby loads nothing and logs nothing until it is known."""
    from cluster_singletons.cluster.database_clock import DatabaseClock

    _schedules(app)
    clock = DatabaseClock.of(SystemClock(), get_settings())
    standby = Standby(app, settings=get_settings())
    standby.sync(clock)
    assert standby.take() is None and "failed" not in caplog.text
