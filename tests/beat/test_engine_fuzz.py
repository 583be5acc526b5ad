"""The engine, fuzzed: random django-celery-beat rows (valid and not) and random operations,
run by the real engine on a frozen clock against the real database and broker.

After every step: the engine did not raise; nothing is recorded further ahead than
``beat_lookahead``; each schedule has at most one live heap item; nothing valid is left
overdue; a flagged schedule and a paused one dispatch nothing new; no tick is published
under two task ids, and no task id is published twice. ``make test`` runs a few examples,
``.ci/run`` many more (``HYPOTHESIS_PROFILE=ci``); a failure prints the shrunk example.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.db import connection
from django.db.models.functions import Now
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    PeriodicTasks,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_singletons.beat import ledger, schedule_records
from cluster_singletons.models import Lease, Run, ScheduleRecord
from tests.beat.test_engine import T0, Leader, _drain

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

LOOKAHEAD = timedelta(seconds=1)

# Mostly valid values, so that most rows run and edits hit running schedules; the rest
# are the bad rows users write.
_PERIODS = st.sampled_from(["seconds"] * 6 + ["minutes", "hours", "microseconds", "weeks"])
_EVERY = st.sampled_from([2, 5, 10, 10, 30, 60, 90, 10**7])
_MINUTE = st.sampled_from(["*", "0", "*/7", "30", "61"])
_HOUR = st.sampled_from(["*", "*", "3", "*/2", "25"])
_DAY = st.sampled_from(["*", "*", "*", "1", "30"])
_MONTH = st.sampled_from(["*", "*", "*", "2"])
_WEEKDAY = st.sampled_from(["*", "*", "*", "1-5", "x"])
_ZONES = st.sampled_from(["UTC", "UTC", "Europe/Berlin", "America/New_York", "Mars/Olympus"])
_OFFSET = st.integers(min_value=-86_400 * 30, max_value=86_400 * 30)

rows = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["interval", "interval", "crontab", "clocked"]),
        "every": _EVERY,
        "period": _PERIODS,
        "cron": st.tuples(_MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY),
        "zone": _ZONES,
        "clocked": _OFFSET,
        "args": st.sampled_from(["[]"] * 6 + ["[1, 2]"] * 3 + ["[bad", "null"]),
        "kwargs": st.sampled_from(["{}"] * 6 + ['{"a": 1}'] * 3 + ["[bad", "[]"]),
        "headers": st.sampled_from(["{}"] * 9 + ["[bad"]),
        "expires": st.sampled_from([None] * 9 + [-3600, 3600]),
        "start": st.sampled_from([None] * 6 + [-86_400, -5, 30, 86_400 * 30]),
        "one_off": st.sampled_from([False] * 9 + [True]),
        "enabled": st.sampled_from([True] * 9 + [False]),
        "task": st.sampled_from(["t.tick"] * 9 + ["no.such.task"]),
    }
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([1, 3, 9, 60, 3600, 86_400])),
        st.tuples(st.just("create"), rows),
        st.tuples(
            st.sampled_from(["edit", "flip", "delete", "pause", "resume", "run"]), st.integers(0, 9)
        ),
    ),
    max_size=12,
)


def _create(name: str, row: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": name, "task": row["task"]}
    if row["kind"] == "interval":
        fields["interval"] = IntervalSchedule.objects.create(
            every=row["every"], period=row["period"]
        )
    elif row["kind"] == "crontab":
        minute, hour, day, month, weekday = row["cron"]
        fields["crontab"] = CrontabSchedule.objects.create(
            minute=minute,
            hour=hour,
            day_of_month=day,
            month_of_year=month,
            day_of_week=weekday,
            timezone="UTC",
        )
        with connection.cursor() as cursor:  # any zone, as SQL or an older version could
            cursor.execute(
                f"UPDATE {CrontabSchedule._meta.db_table} SET timezone = %s WHERE id = %s",
                [row["zone"], fields["crontab"].pk],
            )
    else:
        at = T0 + timedelta(seconds=row["clocked"])
        fields["clocked"] = ClockedSchedule.objects.create(clocked_time=at)
        fields["one_off"] = True
    for column in ("args", "kwargs", "headers"):
        fields[column] = row[column]
    if row["expires"] is not None:
        fields["expires"] = T0 + timedelta(seconds=row["expires"])
    if row["start"] is not None:
        fields["start_time"] = T0 + timedelta(seconds=row["start"])
    fields["one_off"] = fields.get("one_off") or row["one_off"]
    fields["enabled"] = row["enabled"]
    PeriodicTask.objects.create(**fields)


def _reset(app: Celery) -> None:
    """Empty the tables an example used (raw deletes: some rows hold invalid zones)."""
    tables = (PeriodicTask, IntervalSchedule, CrontabSchedule, ClockedSchedule, PeriodicTasks)
    with connection.cursor() as cursor:
        for model in (*tables, Run, ScheduleRecord, Lease):
            cursor.execute(f"DELETE FROM {model._meta.db_table}")
    _drain(app)


def _check(leader: Leader, published: dict[str, str], app: Celery) -> None:
    now = leader.clock.now()
    scheduled = Run.objects.filter(kind=Run.Kind.SCHEDULED)
    assert not scheduled.filter(tick__gt=now + LOOKAHEAD).exists(), "recorded too far ahead"
    catalog = leader.engine.catalog
    for key, entry in catalog.entries.items():
        assert catalog.live_items(key) <= 1, f"{key} has several heap items"
        if entry.schedule.problem:
            assert entry.due is None and catalog.live_items(key) == 0, key
        elif entry.due is not None and key not in leader.engine.loaded.paused:
            assert entry.due > now - timedelta(seconds=1) or catalog.live_items(key), key
    for message in _drain(app):
        task_id, tick = message["id"], message["cluster_context"]["tick"]
        schedule = message["cluster_context"]["schedule"]
        assert task_id not in published, f"{task_id} published twice"
        published[task_id] = f"{schedule}|{tick}"
    assert len(set(published.values())) == len(published), "one tick under two task ids"


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    deadline=None,
)
@given(initial=st.lists(rows, max_size=6), ops=operations)
def test_the_engine_never_raises_and_keeps_its_invariants(
    app: Celery, initial: list[dict[str, Any]], ops: list[tuple[str, Any]]
) -> None:
    _reset(app)
    names: list[str] = []
    for row in initial:
        names.append(f"r{len(names)}")
        _create(names[-1], row)
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    published: dict[str, str] = {}
    paused_at: dict[str, Any] = {}
    second = 0.0
    _check(leader, published, app)
    for op, arg in ops:
        if op == "advance":
            second += arg
        elif op == "create":
            names.append(f"r{len(names)}")
            _create(names[-1], arg)
        elif names:
            name = names[arg % len(names)]
            tasks = PeriodicTask.objects.filter(name=name)
            if op == "edit":
                tasks.update(args=json.dumps([second]), date_changed=leader.clock.now())
                PeriodicTasks.update_changed()
            elif op == "flip":
                for task in tasks:
                    tasks.update(enabled=not task.enabled)  # a bulk update: no signal
            elif op == "delete":
                tasks.delete()
            elif op in {"pause", "resume"}:
                key = f"periodic:{name}"
                note = "fuzz" if op == "pause" else None
                schedule_records.set_paused(key, note, using="default")
            elif op == "run":
                entry = leader.engine.catalog.entries.get(f"periodic:{name}")
                if entry is not None and not entry.schedule.problem:  # as control.run_now
                    manual = ledger.Intent.run_of(
                        entry.schedule, leader.clock.now(), kind=Run.Kind.MANUAL
                    )
                    ledger.record([manual], last_ticks={}, term=None, using="default", ttl=30)
        second += 1
        scheduled = Run.objects.filter(kind=Run.Kind.SCHEDULED)
        before = set(scheduled.values_list("task_id", flat=True))
        leader.at(second)
        _check(leader, published, app)
        for key in leader.engine.loaded.paused:
            paused_at.setdefault(key, leader.clock.now())
        for key in set(paused_at) - leader.engine.loaded.paused:
            del paused_at[key]
        new = scheduled.exclude(task_id__in=before).exclude(task_id="")
        for run in new.exclude(status=Run.Status.SKIPPED):
            entry = leader.engine.catalog.entries.get(run.schedule)
            assert entry is None or not entry.schedule.problem, f"{run.schedule} is flagged"
            since = paused_at.get(run.schedule)
            assert since is None or run.tick <= since + LOOKAHEAD, f"{run.schedule} is paused"
    Lease.objects.filter(name="beat").update(expires_at=Now())
