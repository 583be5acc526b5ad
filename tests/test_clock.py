"""The clock protocol: the real clock and the frozen one tests drive."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from cluster_singletons.clock import Clock, FrozenClock, SystemClock

pytestmark = pytest.mark.unit


def test_a_frozen_clock_moves_only_when_told_and_waiting_advances_it() -> None:
    clock = FrozenClock(start=5.0, wall=datetime(2026, 1, 1, tzinfo=UTC))
    assert (clock.monotonic(), clock.now()) == (5.0, datetime(2026, 1, 1, tzinfo=UTC))
    assert clock.wait(threading.Event(), 2.5) is False
    clock.sleep(0.5)
    assert clock.monotonic() == 8.0
    assert clock.now() == datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)
    assert clock.monotonic_ns() == 8_000_000_000
    assert clock.time_ns() == int(datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC).timestamp()) * 10**9


def test_a_set_event_does_not_advance_a_frozen_clock() -> None:
    clock, event = FrozenClock(), threading.Event()
    event.set()
    assert clock.wait(event, 10) is True and clock.monotonic() == 1000.0


def test_stepping_the_wall_clock_leaves_the_monotonic_one() -> None:
    clock = FrozenClock()
    before = clock.now()
    clock.step_wall(-3)
    assert clock.now() == before - timedelta(seconds=3) and clock.monotonic() == 1000.0


def test_the_system_clock_keeps_the_protocol_and_its_short_sleeps_are_short() -> None:
    clock: Clock = SystemClock()
    start = clock.monotonic_ns()
    clock.sleep(0.001)
    assert 1_000_000 <= clock.monotonic_ns() - start < 500_000_000
    assert abs(clock.time_ns() / 1e9 - clock.now().timestamp()) < 1
