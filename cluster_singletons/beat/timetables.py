"""When a schedule's ticks fall: cron expressions, fixed intervals, one instant, solar events.

A timetable answers one question, ``next_after(t)``: the first tick strictly after the
aware instant ``t``, as an aware UTC datetime (``None``: no more ticks). Ticks are pure
functions of the schedule, never of when a process happened to wake up, so every leader
computes the same ticks and the run ledger can deduplicate them.

Time zones and daylight saving time (one behaviour, for every zone):

- Cron expressions are wall-clock times in the schedule's zone, iterated by ``croniter``
  over naive local times.
- Vixie cron's rule. An expression whose hour field is a wildcard or a step (``0 * * * *``,
  ``*/15 */2 * * *``) follows real time: in the repeated hour when clocks go back it runs
  at both occurrences of its times (every real hour, for ``0 * * * *``), and in the hour
  skipped when clocks go forward it has no run (no phantom run: ``30 * * * *`` runs at
  01:30 and 03:30, an hour apart).
- An expression at fixed hours (``30 2 * * *``) runs once per day: a wall-clock time that
  occurs twice runs at its first occurrence, and one that does not exist runs at the
  first instant after the gap (``02:30`` runs at ``03:00``), several such times coalesced
  into that one run. Nothing is silently dropped.
- Intervals are exact elapsed time (``every`` seconds from an anchor), unaffected by DST.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cached_property, lru_cache
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cron_descriptor import get_description
from croniter import CroniterBadDateError, croniter

from cluster_singletons.errors import ScheduleInvalid

_REWIND = timedelta(minutes=61)
#: Interval ticks are anchored here unless a schedule has a start time.
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Timetable(Protocol):
    def next_after(self, after: datetime) -> datetime | None:
        """The first tick strictly after ``after`` (aware), in UTC; ``None`` if none is left."""
        ...

    def describe(self) -> str:
        """A human-readable description (``"Every 5 minutes"``)."""
        ...


def zone(name: str | None) -> tzinfo:
    """The zone named ``name`` (``None``/empty: UTC); ``ScheduleInvalid`` if unknown."""
    if not name or name == "UTC":
        return UTC
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleInvalid(f"unknown time zone {name!r}") from exc


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression in a time zone."""

    expression: str
    tz: tzinfo = UTC

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str) or len(self.expression.split()) != 5:
            raise ScheduleInvalid(
                f"cron expression {self.expression!r} must have 5 fields "
                "(minute hour day-of-month month day-of-week)"
            )
        if not _valid_cron(self.expression):
            raise ScheduleInvalid(f"invalid cron expression {self.expression!r}")
        if not _fires(self.expression):
            raise ScheduleInvalid(f"cron expression {self.expression!r} never fires")

    def next_after(self, after: datetime) -> datetime | None:
        local = after.astimezone(self.tz)
        start = local.replace(tzinfo=None)
        earlier = (after - _REWIND).astimezone(self.tz)
        later = (after + _REWIND).astimezone(self.tz)
        if not earlier.utcoffset() == local.utcoffset() == later.utcoffset():
            # Clocks change within an hour of ``after``: the wall clock can be behind ticks
            # still to come (a repeated hour) or past ones, so walk from before the change;
            # the loop skips what is not after ``after``.
            start = earlier.replace(tzinfo=None)
        real_time = self.follows_real_time
        walk = _walker(self.expression, start)
        for _ in range(100_000):
            for candidate in _instants(walk.get_next(datetime), self.tz, real_time=real_time):
                if candidate > after:
                    return candidate
        raise ScheduleInvalid(f"cron expression {self.expression!r} yields no next time")

    @cached_property
    def follows_real_time(self) -> bool:
        """Whether the hour field is a wildcard or a step (Vixie cron's DST rule)."""
        hour = self.expression.split()[1]
        return hour == "*" or hour.startswith("*/")

    def describe(self) -> str:
        text = str(get_description(self.expression))
        return text if self.tz is UTC else f"{text} ({self.tz})"


@dataclass(frozen=True)
class Every:
    """Every ``seconds``, on a grid anchored at ``anchor`` (default: the Unix epoch)."""

    seconds: float
    anchor: datetime = UNIX_EPOCH

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ScheduleInvalid(
                f"interval must be a positive number of seconds, not {self.seconds!r}"
            )
        try:
            self.anchor + timedelta(seconds=self.seconds)
        except OverflowError:
            raise ScheduleInvalid(
                f"interval of {self.seconds:g} seconds reaches beyond the calendar (year 9999)"
            ) from None

    def next_after(self, after: datetime) -> datetime | None:
        if after < self.anchor:
            return self.anchor
        elapsed = (after - self.anchor).total_seconds()
        steps = math.floor(elapsed / self.seconds) + 1
        tick = self.anchor + timedelta(seconds=steps * self.seconds)
        while tick <= after:  # float rounding at large step counts
            steps += 1
            tick = self.anchor + timedelta(seconds=steps * self.seconds)
        return tick.astimezone(UTC)

    def describe(self) -> str:
        seconds = self.seconds
        for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
            if seconds >= size and seconds % size == 0:
                count = int(seconds // size)
                return f"Every {count} {unit}s" if count != 1 else f"Every {unit}"
        return f"Every {seconds:g} seconds" if seconds != 1 else "Every second"


@dataclass(frozen=True)
class Once:
    """One instant (django-celery-beat's clocked schedule)."""

    at: datetime

    def next_after(self, after: datetime) -> datetime | None:
        return self.at.astimezone(UTC) if self.at > after else None

    def describe(self) -> str:
        return f"Once at {self.at.astimezone(UTC).isoformat()}"


@dataclass(frozen=True)
class Solar:
    """A solar event at a place, computed by Celery's ``solar`` schedule (needs ``ephem``)."""

    event: str
    latitude: float
    longitude: float

    def __post_init__(self) -> None:
        try:
            self._schedule(datetime.now(UTC))
        except ImportError as exc:
            raise ScheduleInvalid("solar schedules need the 'ephem' package") from exc
        except (ValueError, KeyError) as exc:
            raise ScheduleInvalid(f"invalid solar schedule: {exc}") from exc

    def _schedule(self, now: datetime) -> Any:
        from celery.schedules import solar

        maker: Any = solar
        return maker(self.event, self.latitude, self.longitude, nowfun=lambda: now)

    def next_after(self, after: datetime) -> datetime | None:
        # Celery computes the next event after its "last run"; given `after` as that.
        schedule = self._schedule(after)
        remaining: timedelta = schedule.remaining_estimate(after)
        tick: datetime = (after + remaining).astimezone(UTC).replace(microsecond=0)
        return tick if tick > after else tick + timedelta(seconds=1)

    def describe(self) -> str:
        return f"At {self.event.replace('_', ' ')} ({self.latitude}, {self.longitude})"


#: Where a new expression is first iterated from, to find expressions that never fire.
_PROBE_FROM = datetime(2000, 1, 1)


@lru_cache(maxsize=4096)
def _valid_cron(expression: str) -> bool:
    return bool(croniter.is_valid(expression))


@lru_cache(maxsize=4096)
def _fires(expression: str) -> bool:
    """Whether ``expression`` has a next time at all (``0 0 30 2 *`` passes ``is_valid``
    but never fires): iterated once, from a fixed instant, per expression."""
    try:
        croniter(expression, _PROBE_FROM).get_next(datetime)
    except (CroniterBadDateError, ValueError, KeyError, OverflowError):
        return False
    return True


#: Parsing an expression costs five times a step: one iterator per expression and thread,
#: shared by every schedule with that expression (thousands of crontabs share a handful).
_walkers = threading.local()
_WALKERS_MAX = 4096


def _walker(expression: str, start: datetime) -> croniter:
    """This thread's iterator over ``expression``, positioned at ``start``."""
    cache: dict[str, croniter] | None = getattr(_walkers, "by_expression", None)
    if cache is None:
        cache = _walkers.by_expression = {}
    walk = cache.get(expression)
    if walk is None:
        if len(cache) >= _WALKERS_MAX:
            cache.clear()
        walk = cache[expression] = croniter(expression, start)
    else:
        walk.set_current(start, force=True)
    return walk


def preview(timetable: Timetable, count: int, *, after: datetime) -> list[datetime]:
    """The next ``count`` ticks after ``after``."""
    ticks: list[datetime] = []
    cursor = after
    while len(ticks) < count:
        tick = timetable.next_after(cursor)
        if tick is None:
            break
        ticks.append(tick)
        cursor = tick
    return ticks


def _instants(wall: datetime, tz: tzinfo, *, real_time: bool) -> list[datetime]:
    """The instants at which the naive wall-clock time ``wall`` in ``tz`` runs, in order.

    ``real_time``: every occurrence (two in a repeated hour, none in a skipped one);
    otherwise exactly one (the first occurrence, or the end of the gap).
    """
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) != wall:  # skipped by the clocks
        return [] if real_time else [_to_utc(wall, tz)]
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    return [first, second] if real_time and second != first else [first]


def _to_utc(wall: datetime, tz: tzinfo) -> datetime:
    """The instant of the naive wall-clock time ``wall`` in ``tz``: its first occurrence if
    repeated, the end of the gap if skipped."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # Skipped: fold=0 reads it with the offset before the gap, fold=1 with the one after;
    # the transition lies between the two instants. Find it to the second.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = first
    if low > high:
        low, high = high, low
    offset = low.astimezone(tz).utcoffset()
    while (high - low) > timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(tz).utcoffset() == offset:
            low = mid
        else:
            high = mid
    return high.replace(microsecond=0)
