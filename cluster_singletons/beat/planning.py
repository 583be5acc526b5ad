"""Planning the beat's ticks: a functional core, no database, no clock of its own.

``plan(entry, now, ...)`` decides what the ledger records for one schedule at ``now`` and
moves the schedule's cursor (``Entry``); the engine feeds it the due schedules and writes
what it returns. Everything here is a pure function of its arguments, so catch-up,
coalescing, overlap and pause rules are tested without waiting for schedules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cluster_singletons.beat import ledger
from cluster_singletons.beat.schedule import Override, Schedule
from cluster_singletons.beat.timetables import Every
from cluster_singletons.models import Run
from cluster_singletons.names import Overlap

#: A buffered run is looked at again this often while its predecessor is open.
_OVERLAP_RECHECK = 1.0
#: Ticks counted one by one at most (a year of minutely ticks is counted in full).
_COUNT_CAP = 600_000
#: The most ticks one row says it stands for (its ``ticks`` column is a 32-bit integer):
#: a day of a microsecond interval is more.
MAX_TICKS = 2**31 - 1
_EPSILON = timedelta(microseconds=1)
#: (first tick, last tick, number of ticks)
Range = tuple[datetime, datetime, int]


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How a schedule's ticks are judged: an operator's override (its record) first, then
    the schedule's own option, then the settings' default."""

    skip_if_older_than: float
    overlap: Overlap
    overrides: Mapping[str, Override] = field(default_factory=dict)

    def overlap_of(self, schedule: Schedule) -> Overlap:
        override = self.overrides.get(schedule.key)
        if override is not None and override.overlap is not None:
            return override.overlap
        return schedule.overlap or self.overlap

    def skip_after(self, schedule: Schedule) -> float:
        override = self.overrides.get(schedule.key)
        if override is not None and override.skip_if_older_than is not None:
            return override.skip_if_older_than
        if schedule.skip_if_older_than is not None:
            return schedule.skip_if_older_than
        return self.skip_if_older_than


@dataclass(kw_only=True)
class Entry:
    """One schedule's cursor in the leading beat (mutable: ``plan`` moves it)."""

    schedule: Schedule
    #: The last tick accounted for (recorded, skipped or paused through).
    last_tick: datetime | None
    #: The schedule's next tick not yet accounted for; None: no more ticks.
    next_tick: datetime | None = None
    #: When this schedule next needs attention (its next tick, or an overlap recheck).
    due: datetime | None = None
    #: The last run dispatched and not yet known to have finished.
    open_run: str | None = None
    open_since: datetime | None = None
    #: buffer_one: the ticks (first, last, count) waiting for the open run to finish.
    buffered: Range | None = None
    #: The sequence number of this schedule's live item in the catalog's heaps (-1: none).
    queued: int = -1


def resume(
    schedule: Schedule, previous: Entry | None, *, recorded: datetime | None, now: datetime
) -> Entry:
    """The cursor of ``schedule`` as loaded at ``now``, or as edited (``previous``: the
    cursor before the edit).

    - The chain continues from the ledger's last tick (``recorded``); a schedule new to
      the ledger starts from its source's record of its last run, else from when it was
      last edited, else from ``now``.
    - An edit takes effect from ``now``: no tick before the edit is planned again, and the
      open run it had is still awaited.
    """
    last = previous.last_tick if previous is not None else recorded
    start = last or schedule.last_run_at or schedule.changed_at or now
    entry = Entry(schedule=schedule, last_tick=last)
    if previous is not None:
        start = max(start, now)
        entry.open_run, entry.open_since = previous.open_run, previous.open_since
    entry.next_tick = entry.due = schedule.first_tick_after(start)
    return entry


def plan(entry: Entry, now: datetime, *, paused: bool, policy: Policy) -> list[ledger.Intent]:
    """The ledger rows for ``entry``'s ticks up to ``now``; advances its ticks and ``due``.

    - Missed ticks older than the catch-up horizon become one ``skipped`` row (range
      and count); the newer ones one run, coalesced, at the latest tick.
    - While the previous run is open: ``skip`` records the run as skipped,
      ``buffer_one`` holds it (one, coalesced) and asks to be looked at again shortly,
      ``allow_all`` dispatches it.
    - A paused schedule's ticks pass: ``last_tick`` moves on, nothing is recorded.
    """
    schedule = entry.schedule
    intents: list[ledger.Intent] = []
    skip_after = policy.skip_after(schedule)
    horizon = now - timedelta(seconds=skip_after)
    new: Range | None = None
    tick = entry.next_tick
    if tick is not None and tick <= now:
        if tick < horizon:
            first, last, count = tick_range(schedule, tick, horizon - _EPSILON)
            if not paused:
                reason = f"missed: older than skip_if_older_than={skip_after:g}s"
                intents.append(_skipped(schedule, (first, last, count), reason))
            entry.last_tick = last
            tick = schedule.first_tick_after(last)
        if tick is not None and tick <= now:
            new = tick_range(schedule, tick, now)
            tick = schedule.first_tick_after(new[1])
        entry.next_tick = tick
    if entry.buffered is not None:
        new = _merge(entry.buffered, new)
        entry.buffered = None
    entry.due = entry.next_tick
    if new is None:
        return intents
    first, last, count = new
    if paused:
        entry.last_tick = last
        return intents
    if entry.open_run is not None:
        overlap = policy.overlap_of(schedule)
        if overlap == "buffer_one":
            entry.buffered = new
            recheck = now + timedelta(seconds=_OVERLAP_RECHECK)
            entry.due = recheck if entry.due is None else min(entry.due, recheck)
            return intents
        if overlap == "skip":
            reason = f"overlap: run {entry.open_run} has not finished"
            intents.append(_skipped(schedule, new, reason))
            entry.last_tick = last
            return intents
    tick = now if schedule.from_previous else last
    intents.append(
        ledger.Intent.run_of(
            schedule,
            tick,
            first_tick=first if count > 1 else None,
            ticks=count,
            reason=f"coalesced {count} missed ticks" if count > 1 else "",
        )
    )
    entry.last_tick = tick
    _after_run(entry, tick)
    return intents


def recorded(entry: Entry, tick: datetime, *, ran: bool) -> None:
    """Move ``entry`` past ``tick``, which a leader recorded (``ran``: as a run, else as
    skipped), to where ``plan`` left that leader's cursor: how a standby follows the
    ledger. An earlier or equal tick changes nothing."""
    if entry.last_tick is not None and tick <= entry.last_tick:
        return
    entry.last_tick, entry.buffered = tick, None
    entry.next_tick = entry.due = entry.schedule.first_tick_after(tick)
    if ran:
        _after_run(entry, tick)


def _after_run(entry: Entry, tick: datetime) -> None:
    """The cursor after a run for ``tick``: counted from the run (``from_previous``), or
    finished (one-off)."""
    schedule = entry.schedule
    if schedule.from_previous and isinstance(schedule.timetable, Every):
        entry.next_tick = entry.due = tick + timedelta(seconds=schedule.timetable.seconds)
    if schedule.one_off:
        entry.next_tick = entry.due = None


def tick_range(schedule: Schedule, first: datetime, until: datetime) -> Range:
    """(first, last, count) of ticks from ``first`` up to ``until``."""
    timetable = schedule.timetable
    if isinstance(timetable, Every) and schedule.expires is None:
        steps = int((until - first).total_seconds() // timetable.seconds)
        last = first + timedelta(seconds=steps * timetable.seconds)
        return first, last, min(steps + 1, MAX_TICKS)
    last, count = first, 1
    while count < _COUNT_CAP:
        following = schedule.first_tick_after(last)
        if following is None or following > until:
            break
        last, count = following, count + 1
    return first, last, count


def _skipped(schedule: Schedule, ticks: Range, reason: str) -> ledger.Intent:
    first, last, count = ticks
    return ledger.Intent(
        schedule=schedule.key,
        tick=last,
        first_tick=first if count > 1 else None,
        ticks=count,
        status=Run.Status.SKIPPED,
        reason=reason,
    )


def _merge(older: Range, newer: Range | None) -> Range:
    if newer is None:
        return older
    return older[0], newer[1], older[2] + newer[2]
