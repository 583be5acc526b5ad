"""The database-clock estimate: pure functions of samples, and the clock built on them."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_singletons import metrics
from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster.database_clock import (
    DRIFT,
    DatabaseClock,
    Estimate,
    Sample,
    bounds,
    refine,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_one_sample_gives_the_round_trip_midpoint_with_half_the_round_trip_as_error() -> None:
    # Sent at monotonic 100.0, answered at 100.010; the database said 1,000,000.005.
    estimate = bounds(Sample(sent=100.0, received=100.010, database=1_000_000.005))
    assert estimate.offset == pytest.approx(1_000_000.005 - 100.005)
    assert estimate.error == pytest.approx(0.005 + DRIFT * 0.010)
    # A clock counting milliseconds read up to a millisecond late: the interval says so.
    coarse = bounds(Sample(sent=100.0, received=100.010, database=1e6, resolution=0.001), drift=0.0)
    assert (coarse.low, coarse.high) == pytest.approx((1e6 - 100.010, 1e6 + 0.001 - 100.0))


def test_a_sample_answered_before_it_was_sent_is_refused() -> None:
    with pytest.raises(ValueError, match="sent <= received"):
        Sample(sent=2.0, received=1.0, database=0.0)


def test_the_narrowest_round_trip_is_kept_and_a_wider_one_does_not_spoil_it() -> None:
    narrow = Sample(sent=10.0, received=10.002, database=5010.001)
    wide = Sample(sent=13.0, received=13.400, database=5013.100)
    estimate = refine(refine(None, narrow), wide)
    # The first sample, aged from its receipt to the second's.
    assert estimate.error == pytest.approx(0.001 + DRIFT * (0.002 + 13.400 - 10.002))
    assert estimate.offset == pytest.approx(5000.0)


def test_a_database_clock_that_was_stepped_replaces_the_estimate() -> None:
    before = refine(None, Sample(sent=10.0, received=10.002, database=5010.001))
    after = refine(before, Sample(sent=13.0, received=13.002, database=5023.001))
    assert after == bounds(Sample(sent=13.0, received=13.002, database=5023.001))


#: A round trip: when sent, how long it took, where in it the database read its clock.
trips = st.tuples(
    st.floats(0.0, 5.0),  # gap since the previous sample was received
    st.floats(0.0, 0.5),  # round trip
    st.floats(0.0, 1.0),  # fraction of the round trip at which the database read its clock
)


@given(
    offset=st.floats(-1e5, 1e5),
    drift=st.floats(-DRIFT, DRIFT),
    resolution=st.sampled_from([0.0, 1e-6, 0.001]),
    samples=st.lists(trips, min_size=1, max_size=30),
)
def test_the_estimate_always_holds_the_true_offset_and_is_never_wider_than_the_newest_sample(
    offset: float,
    drift: float,
    resolution: float,
    samples: list[tuple[float, float, float]],
) -> None:
    """Samples of a database clock ``offset`` ahead of the monotonic clock, drifting by
    ``drift``, read at any point of each round trip and truncated to ``resolution``."""
    estimate: Estimate | None = None
    at = 50.0
    for gap, trip, where in samples:
        sent = at + gap
        at = sent + trip
        read = sent + where * trip
        true = read + offset + drift * read
        database = math.floor(true / resolution) * resolution if resolution else true
        sample = Sample(sent=sent, received=at, database=database, resolution=resolution)
        estimate = refine(estimate, sample)
        truth = offset + drift * at
        slack = 1e-6 * max(1.0, abs(offset))  # float rounding at large offsets
        assert estimate.low - slack <= truth <= estimate.high + slack
        assert estimate.error <= bounds(sample).error + slack


def test_the_clock_reads_the_database_time_never_ahead_and_ignores_the_wall_clock() -> None:
    base = FrozenClock(start=100.0, wall=T0)  # this host's wall clock: 2026-01-01
    clock = DatabaseClock(base)
    database = T0 + timedelta(seconds=30)  # the database's: 30 s later
    base.advance(0.004)
    clock.observe(100.0, base.monotonic(), database + timedelta(seconds=0.002))

    def seconds(at: datetime) -> float:
        return (at - T0).total_seconds()

    # The database read its clock at some point of the 4 ms: now is its earliest reading.
    assert seconds(clock.now()) == pytest.approx(30.002 - DRIFT * 0.004, abs=1e-6)
    assert clock.offset() == pytest.approx(30.0, abs=0.002)
    assert clock.time_ns() == pytest.approx(clock.now().timestamp() * 1e9, abs=1e3)
    base.step_wall(-3600)  # an operator moves this host's clock: the database's does not move
    base.advance(10.0)
    expected = 30.002 + 10.0 - DRIFT * (0.004 + 10.0)
    assert seconds(clock.now()) == pytest.approx(expected, abs=1e-6)
    assert clock.monotonic() == base.monotonic()


def test_the_clock_is_not_read_before_a_renewal_told_it() -> None:
    clock = DatabaseClock(FrozenClock())
    assert not clock.synced and clock.offset() is None
    with pytest.raises(RuntimeError, match="not known yet"):
        clock.now()


def test_an_offset_above_the_threshold_is_warned_once_and_exported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = FrozenClock(start=0.0, wall=T0)
    clock = DatabaseClock(base, warn_above=1.0)
    caplog.set_level(logging.INFO, logger="cluster_singletons.runner")
    for database in (T0 + timedelta(seconds=30), T0 + timedelta(seconds=31)):
        base.advance(1.0)
        clock.observe(base.monotonic(), base.monotonic(), database)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "29.000 s behind the database's" in warned[0].getMessage()
    assert metrics.CLOCK_OFFSET._value.get() == pytest.approx(29.0)
    base.advance(1.0)
    clock.observe(base.monotonic(), base.monotonic(), T0 + timedelta(seconds=2.5))
    assert caplog.records[-1].levelno == logging.INFO
    assert "within 0.500 s" in caplog.records[-1].getMessage()
