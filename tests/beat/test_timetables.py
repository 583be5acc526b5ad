"""Timetables: cron in time zones across DST, intervals, previews (pure functions)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from cluster_singletons.beat.timetables import Cron, Every, Once, preview, zone
from cluster_singletons.errors import ScheduleInvalid

pytestmark = pytest.mark.unit


def _local(ticks: list[datetime], tz: str) -> list[str]:
    return [t.astimezone(zone(tz)).strftime("%m-%d %H:%M%z") for t in ticks]


@pytest.mark.parametrize(
    ("tz", "day", "expected"),
    [
        # Spring forward: 02:00-03:00 does not exist; 02:30 runs at 03:00, once.
        ("Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), ["03-29 03:00+0200"]),
        ("America/New_York", datetime(2026, 3, 7, 12, tzinfo=UTC), ["03-08 03:00-0400"]),
        # Fall back: 02:30 (Berlin) / 01:30 (New York) happens twice; it runs at the first.
        ("Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC), ["10-25 02:30+0200"]),
        ("America/New_York", datetime(2026, 10, 31, 12, tzinfo=UTC), ["11-01 01:30-0400"]),
    ],
)
def test_daily_job_in_the_dst_hour_runs_exactly_once(
    tz: str, day: datetime, expected: list[str]
) -> None:
    hour = "2" if tz == "Europe/Berlin" else ("2" if day.month == 3 else "1")
    ticks = preview(Cron(f"30 {hour} * * *", zone(tz)), 2, after=day)
    assert _local(ticks[:1], tz) == expected
    # The next day's run is back at its wall-clock time.
    assert ticks[1] - ticks[0] == (
        timedelta(hours=23, minutes=30) if day.month == 3 else timedelta(hours=25)
    )


@pytest.mark.parametrize(
    ("tz", "start", "expected"),
    [
        # Fall back: the repeated hour's 02:00 (Berlin) / 01:00 (New York) runs twice,
        # once per real hour, as Vixie cron runs jobs whose hour field is a wildcard.
        (
            "Europe/Berlin",
            datetime(2026, 10, 24, 22, tzinfo=UTC),
            ["01:00+0200", "02:00+0200", "02:00+0100", "03:00+0100", "04:00+0100"],
        ),
        (
            "America/New_York",
            datetime(2026, 11, 1, 4, tzinfo=UTC),
            ["01:00-0400", "01:00-0500", "02:00-0500", "03:00-0500", "04:00-0500"],
        ),
    ],
)
def test_a_wildcard_hour_cron_runs_every_real_hour_across_fall_back(
    tz: str, start: datetime, expected: list[str]
) -> None:
    ticks = preview(Cron("0 * * * *", zone(tz)), 5, after=start)
    assert [t.astimezone(zone(tz)).strftime("%H:%M%z") for t in ticks] == expected
    assert {b - a for a, b in itertools.pairwise(ticks)} == {timedelta(hours=1)}


@pytest.mark.parametrize(
    ("tz", "start"),
    [
        ("Europe/Berlin", datetime(2026, 3, 28, 23, tzinfo=UTC)),
        ("America/New_York", datetime(2026, 3, 8, 5, tzinfo=UTC)),
    ],
)
def test_a_wildcard_hour_cron_has_no_phantom_run_in_the_spring_gap(
    tz: str, start: datetime
) -> None:
    ticks = preview(Cron("30 * * * *", zone(tz)), 4, after=start)
    walls = [t.astimezone(zone(tz)).strftime("%H:%M") for t in ticks]
    assert walls == ["00:30", "01:30", "03:30", "04:30"]
    assert {b - a for a, b in itertools.pairwise(ticks)} == {timedelta(hours=1)}


def test_a_stepped_hour_cron_follows_real_time_and_a_fixed_hour_one_runs_once() -> None:
    berlin = zone("Europe/Berlin")
    start = datetime(2026, 10, 24, 21, tzinfo=UTC)
    stepped = preview(Cron("0 */2 * * *", berlin), 3, after=start)
    assert [t.astimezone(berlin).strftime("%H:%M%z") for t in stepped] == [
        "00:00+0200",
        "02:00+0200",
        "02:00+0100",
    ]
    fixed = preview(Cron("0 2 * * *", berlin), 2, after=start)
    assert [t.astimezone(berlin).strftime("%d %H:%M%z") for t in fixed] == [
        "25 02:00+0200",
        "26 02:00+0100",
    ]


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York"])
def test_skipped_hour_ticks_coalesce_at_the_end_of_the_gap(tz: str) -> None:
    start = datetime(2026, 3, 29, 0, tzinfo=UTC) if tz == "Europe/Berlin" else None
    start = start or datetime(2026, 3, 8, 6, tzinfo=UTC)
    ticks = preview(Cron("*/30 * * * *", zone(tz)), 4, after=start)
    walls = [t.astimezone(zone(tz)).strftime("%H:%M") for t in ticks]
    assert walls == ["01:30", "03:00", "03:30", "04:00"]


def test_cron_validation_and_description() -> None:
    with pytest.raises(ScheduleInvalid, match="invalid cron expression"):
        Cron("61 * * * *")
    with pytest.raises(ScheduleInvalid, match="5 fields"):
        Cron("* * *")
    with pytest.raises(ScheduleInvalid, match="unknown time zone"):
        zone("Mars/Olympus")
    assert Cron("*/5 * * * *").describe() == "Every 5 minutes"
    assert "Europe/Berlin" in Cron("0 3 * * *", zone("Europe/Berlin")).describe()


def test_interval_grid_is_anchored_and_exact() -> None:
    every = Every(10, datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC))
    after = datetime(2026, 1, 1, 0, 0, 13, tzinfo=UTC)
    assert every.next_after(after) == datetime(2026, 1, 1, 0, 0, 23, tzinfo=UTC)
    assert every.next_after(datetime(2025, 1, 1, tzinfo=UTC)) == every.anchor
    assert Every(3600).describe() == "Every hour"
    with pytest.raises(ScheduleInvalid):
        Every(0)


def test_once_runs_once() -> None:
    at = datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert preview(Once(at), 3, after=datetime(2026, 1, 1, tzinfo=UTC)) == [at]
    assert Once(at).next_after(at) is None
