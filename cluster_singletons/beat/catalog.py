"""The leading beat's schedules in memory: one cursor per schedule and the heaps of their
due times.

Invariants:

- Each schedule has at most one live heap entry, whatever is edited: an entry carries the
  sequence number of its live heap item, and an item whose number is not its entry's
  (left behind by an edit or a reload) is dropped when popped.
- A schedule is judged alone: an exception while turning one schedule into its next tick
  makes that schedule a problem (no timetable, no heap entry, the reason in ``problem``);
  every other schedule goes on.
- Nothing here touches the database, the broker or a clock: the engine passes ``now`` and
  what the ledger recorded.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cluster_singletons.beat import ledger, planning
from cluster_singletons.beat.planning import Entry
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.errors import describe
from cluster_singletons.models import Run

logger = logging.getLogger("cluster_singletons.beat")

#: (due, sequence, schedule key)
_Due = tuple[datetime, int, str]
#: What a schedule's record says once no source defines the schedule.
DELETED = "deleted: no source defines this schedule any more"
#: The ledger's last tick of schedules new to the catalog, by key.
Recorded = Callable[[list[str]], Mapping[str, datetime | None]]


@dataclass(kw_only=True)
class Changes:
    """What applying the sources' schedules changed, for the engine to record."""

    #: Schedules that became a problem (a new or different reason).
    flagged: list[Schedule] = field(default_factory=list)
    #: Schedules that run again: their earlier problem is over.
    fixed: list[str] = field(default_factory=list)
    #: Schedules no source defines any more.
    deleted: list[str] = field(default_factory=list)


class Catalog:
    """Schedules by key, their cursors and due times; see the module docstring."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.schedules: dict[str, Schedule] = {}
        #: In-runner ``@cron`` functions by schedule key.
        self.functions: dict[str, Callable[..., Any]] = {}
        self._heap: list[_Due] = []
        #: Schedules planned only when due: their previous run is still open.
        self._waiting: list[_Due] = []
        self._seq = 0
        #: Schedules whose current problem was logged here with its traceback.
        self.logged: set[str] = set()

    def clear(self) -> None:
        self.entries.clear()
        self._heap.clear()
        self._waiting.clear()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def next_due(self) -> datetime | None:
        """When the first schedule falls due (ahead of its tick: the lookahead applies)."""
        return self._heap[0][0] if self._heap else None

    @property
    def next_waiting(self) -> datetime | None:
        """When the first schedule waiting for its open run must be decided."""
        return self._waiting[0][0] if self._waiting else None

    def live_items(self, key: str) -> int:
        """How many live heap items ``key`` has (0 or 1)."""
        entry = self.entries.get(key)
        if entry is None:
            return 0
        return sum(
            1 for _, seq, k in self._heap + self._waiting if k == key and seq == entry.queued
        )

    def push(self, entry: Entry, *, waiting: bool = False) -> None:
        """Queue ``entry`` at its due time (none: not queued), retiring its earlier item."""
        entry.queued = -1
        if entry.due is not None:
            self._seq += 1
            entry.queued = self._seq
            item = (entry.due, self._seq, entry.schedule.key)
            heapq.heappush(self._waiting if waiting else self._heap, item)

    def requeue(self) -> None:
        """Rebuild the heaps from the cursors, dropping retired items (a standby's pushes
        leave one behind for every tick it follows)."""
        self._waiting.clear()
        self._heap = []
        for entry in self.entries.values():
            entry.queued = -1
            if entry.due is not None:
                self._seq += 1
                entry.queued = self._seq
                self._heap.append((entry.due, self._seq, entry.schedule.key))
        heapq.heapify(self._heap)

    @property
    def items(self) -> int:
        """How many items the heaps hold, live or retired."""
        return len(self._heap) + len(self._waiting)

    def follow(self, rows: Iterable[ledger.Recorded]) -> datetime | None:
        """Move the cursors past the ticks a leader recorded (``rows``, by tick) and take
        its runs as open; returns when the newest row was created (None: no rows)."""
        newest: datetime | None = None
        for key, tick, status, task_id, created in rows:
            if newest is None or created > newest:
                newest = created
            entry = self.entries.get(key)
            ran = status != Run.Status.SKIPPED
            if entry is not None and self._recorded(entry, tick, ran=ran) and ran:
                entry.open_run, entry.open_since = task_id, max(created, tick)
        return newest

    def passed(self, ticks: Mapping[str, datetime | None]) -> None:
        """Move the cursors past the last ticks their records say passed (a paused
        schedule's ticks pass without rows)."""
        for key, tick in ticks.items():
            entry = self.entries.get(key)
            if entry is not None and tick is not None:
                self._recorded(entry, tick, ran=False)

    def _recorded(self, entry: Entry, tick: datetime, *, ran: bool) -> bool:
        """``entry`` past ``tick``, requeued; False if it was already."""
        before = entry.last_tick
        planning.recorded(entry, tick, ran=ran)
        if entry.last_tick == before:
            return False
        self.push(entry)
        return True

    def pop_due(
        self, now: datetime, horizon: datetime, *, limit: int, ahead_limit: int
    ) -> list[Entry]:
        """The schedules due by ``now`` and, at most ``ahead_limit`` of them, by ``horizon``;
        waiting ones only once due. At most ``limit`` in all."""
        due: list[Entry] = []
        ahead = 0
        for heap, until in ((self._waiting, now), (self._heap, horizon)):
            while heap and heap[0][0] <= until and len(due) < limit:
                at = heap[0][0]
                if at > now:
                    if ahead >= ahead_limit:
                        break
                    ahead += 1
                _, seq, key = heapq.heappop(heap)
                entry = self.entries.get(key)
                if entry is not None and entry.queued == seq:
                    entry.queued = -1
                    due.append(entry)
        return due

    def apply(self, found: Mapping[str, Schedule], now: datetime, recorded: Recorded) -> Changes:
        """Take the sources' schedules as they are at ``now``: new ones start from the
        ledger (``recorded``), edited ones from ``now``, removed ones are dropped."""
        changes = Changes()
        known = self.entries
        for key in [k for k in known if k not in found]:
            del known[key]
            changes.deleted.append(key)
        new_keys = [k for k in found if k not in known]
        records = recorded(new_keys) if new_keys else {}
        for key, schedule in found.items():
            entry = known.get(key)
            if entry is not None and (
                entry.schedule is schedule or entry.schedule.fingerprint == schedule.fingerprint
            ):
                continue
            self.logged.discard(key)
            before = entry.schedule.problem if entry is not None else None
            try:
                updated = planning.resume(schedule, entry, recorded=records.get(key), now=now)
            except Exception as exc:
                schedule = _broken(schedule, f"its next tick cannot be computed: {describe(exc)}")
                if schedule.problem != before:  # once per distinct problem, with the traceback
                    logger.exception("schedule %s cannot run: %s", key, schedule.problem)
                    self.logged.add(key)
                last = entry.last_tick if entry is not None else records.get(key)
                updated = Entry(schedule=schedule, last_tick=last)
            known[key] = updated
            self.push(updated)
            if schedule.problem and schedule.problem != before:
                changes.flagged.append(schedule)
            elif before and not schedule.problem:
                changes.fixed.append(key)
        self.schedules = {k: e.schedule for k, e in known.items()}
        self.functions = {k: s.fn for k, s in self.schedules.items() if s.fn is not None}
        return changes

    def notes(
        self, changes: Changes, problems: Mapping[str, str], *, recorded: Iterable[str] = ()
    ) -> dict[str, str]:
        """What the schedules' records should now say of their problem (``""``: none;
        ``DELETED``: no source defines it), given what they say (``problems``) and, at the
        start of a term, every key that has a record (``recorded``)."""
        notes = {key: "" for key in changes.fixed}
        notes.update(dict.fromkeys(changes.deleted, DELETED))
        notes.update(dict.fromkeys(set(recorded) - self.schedules.keys(), DELETED))
        for key, problem in problems.items():
            schedule = self.schedules.get(key)
            if schedule is None and problem != DELETED:
                notes[key] = DELETED
            elif schedule is not None and not schedule.problem:
                notes[key] = ""
        return {key: text for key, text in notes.items() if problems.get(key, "") != text}

    def break_(self, entry: Entry, problem: str) -> Schedule:
        """Make ``entry``'s schedule a problem: it is planned no more until it changes.
        Called while handling the exception that found it, whose traceback it logs."""
        schedule = _broken(entry.schedule, problem)
        logger.exception("schedule %s cannot run: %s", schedule.key, problem)
        self.logged.add(schedule.key)
        broken = Entry(schedule=schedule, last_tick=entry.last_tick)
        self.entries[schedule.key] = broken
        self.schedules[schedule.key] = schedule
        return schedule


def _broken(schedule: Schedule, problem: str) -> Schedule:
    """``schedule`` as a problem: no timetable, so no tick; the source row is kept so an
    unchanged row is not rebuilt (and flagged) again."""
    return replace(schedule, timetable=None, problem=problem)
