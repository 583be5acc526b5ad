"""The beat's functional core: what one schedule records at ``now`` (no database, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cluster_singletons.beat.planning import MAX_TICKS, Entry, Policy, plan, tick_range
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.timetables import Every
from cluster_singletons.names import Overlap

pytestmark = pytest.mark.unit

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
POLICY = Policy(skip_if_older_than=60, overlap="skip")


def _entry(last: datetime, overlap: Overlap | None = None) -> Entry:
    every = Schedule(key="beat:ten", source="beat", timetable=Every(10), task="t", overlap=overlap)
    entry = Entry(schedule=every, last_tick=last)
    entry.next_tick = entry.due = every.first_tick_after(last)
    return entry


def test_on_time_tick_is_one_run_and_the_cursor_moves_on() -> None:
    entry = _entry(T0)
    (run,) = plan(entry, T0 + timedelta(seconds=10), paused=False, policy=POLICY)
    assert (run.status, run.tick, run.ticks, run.first_tick) == (
        "pending",
        T0 + timedelta(seconds=10),
        1,
        None,
    )
    assert (entry.last_tick, entry.next_tick) == (run.tick, T0 + timedelta(seconds=20))


def test_downtime_splits_into_one_skipped_range_and_one_coalesced_run() -> None:
    entry = _entry(T0)
    now = T0 + timedelta(minutes=5)  # 30 ticks missed; the horizon is 60 s
    skipped, run = plan(entry, now, paused=False, policy=POLICY)
    assert (skipped.status, skipped.first_tick, skipped.tick, skipped.ticks) == (
        "skipped",
        T0 + timedelta(seconds=10),
        T0 + timedelta(seconds=230),
        23,
    )
    assert (run.first_tick, run.tick, run.ticks) == (now - timedelta(seconds=60), now, 7)


def test_overlap_skip_and_buffer_one_while_the_previous_run_is_open() -> None:
    skipping = _entry(T0)
    skipping.open_run = "previous"
    (row,) = plan(skipping, T0 + timedelta(seconds=10), paused=False, policy=POLICY)
    assert row.status == "skipped" and "previous" in row.reason
    buffering = _entry(T0, overlap="buffer_one")
    buffering.open_run = "previous"
    assert plan(buffering, T0 + timedelta(seconds=10), paused=False, policy=POLICY) == []
    assert buffering.due == T0 + timedelta(seconds=11), "looked at again in a second"
    buffering.open_run = None
    (run,) = plan(buffering, T0 + timedelta(seconds=11), paused=False, policy=POLICY)
    assert (run.status, run.tick) == ("pending", T0 + timedelta(seconds=10))


def test_a_paused_schedule_records_nothing_and_does_not_catch_up() -> None:
    entry = _entry(T0)
    assert plan(entry, T0 + timedelta(seconds=35), paused=True, policy=POLICY) == []
    assert entry.last_tick == T0 + timedelta(seconds=30)
    (run,) = plan(entry, T0 + timedelta(seconds=40), paused=False, policy=POLICY)
    assert run.ticks == 1


def test_a_coalesced_count_beyond_the_ticks_column_is_capped() -> None:
    schedule = Schedule(key="beat:fast", source="beat", timetable=Every(2e-6), task="t")
    first = datetime(2026, 3, 2, 12, tzinfo=UTC)
    start, last, count = tick_range(schedule, first, first + timedelta(days=1))
    assert count == MAX_TICKS
    assert (start, last) == (first, first + timedelta(days=1)), "the range itself is exact"
