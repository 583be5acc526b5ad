"""The beat's schedules as one runner holds them: the catalog (cursors, due times), the
sources' signature when they were last read, what operators set (paused keys,
overrides), and how far the run ledger has been followed.

The leading beat's engine plans from a ``Loaded`` and does the writing; a warm standby
(``standby``) keeps one current while another runner leads, without writing, and hands
it to the engine when its runner takes the lease. Everything here reads the database.

Following the ledger is exact because only the leader records scheduled ticks, one
fenced transaction after another: a transaction that commits after a follow began after
the newest row that follow saw was created, so reading again from that row's time (less
a margin for the server's clock) misses nothing; a row read twice moves nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from cluster_singletons.beat import ledger, refresh, schedule_records
from cluster_singletons.beat.catalog import Catalog, Changes
from cluster_singletons.beat.schedule import Override

#: Ledger rows are read again from this long before the newest one seen.
_MARGIN = timedelta(seconds=0.1)
#: After this runner's own term, from this long before its end (its clock is an estimate).
_HANDED_BACK_MARGIN = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Loaded:
    """One runner's copy of the beat's schedules; see the module docstring."""

    def __init__(self, app: Any, *, using: str, overlap_timeout: float) -> None:
        self.app, self.using = app, using
        self.overlap_timeout = overlap_timeout
        self.catalog = Catalog()
        self.signature: object = None
        self.paused: frozenset[str] = frozenset()
        self.overrides: Mapping[str, Override] = {}
        #: The ledger's rows created from here on are not followed yet (None: not loaded).
        self.since: datetime | None = None
        #: Keys seen paused since the lease was last taken: a paused schedule's ticks pass
        #: without a row to follow, only its record says how far.
        self.was_paused: set[str] = set()
        #: When the newest row followed was created: how far the leader had got.
        self.followed_to: datetime | None = None

    @property
    def loaded(self) -> bool:
        return self.since is not None

    def look(
        self, *, full: bool = False, bystanders: refresh.Bystanders | None = None
    ) -> refresh.Seen:
        """What the sources and the schedules' records say now (the schedules themselves
        only if the sources changed since the last look applied, or ``full``); a leader
        passes its ``bystanders`` (another scheduler dispatching meanwhile)."""
        return refresh.look(
            self.app,
            using=self.using,
            signature=self.signature,
            previous=self.catalog.schedules,
            full=full,
            bystanders=bystanders,
        )

    def load(self, now: datetime) -> None:
        """Every schedule from its sources, its cursor from the ledger, its open run."""
        self.catalog.clear()
        self.signature, self.was_paused = None, set()
        since = ledger.newest(using=self.using)
        self.apply(self.look(full=True), now)
        runs_since = now - timedelta(seconds=self.overlap_timeout)
        for task_id, key, created in ledger.open_runs(since=runs_since, using=self.using):
            entry = self.catalog.entries.get(key)
            if entry is not None:
                entry.open_run, entry.open_since = task_id, created
        self.since = since - _MARGIN if since is not None else _EPOCH
        self.followed_to = since
        # What the leader recorded while the schedules were read.
        self.follow()

    def led_until(self, at: datetime) -> None:
        """This runner led until ``at`` (its estimate of the database's clock; the
        schedules are as its engine left them): follow from there on."""
        self.since, self.followed_to = at - _HANDED_BACK_MARGIN, at

    def resume(
        self, now: datetime, *, bystanders: refresh.Bystanders | None = None
    ) -> refresh.Seen | None:
        """Ready to lead at ``now``: loaded if not yet; else brought up to the ledger, and
        what the sources say now returned, for the leader to apply (and record)."""
        if not self.loaded:
            self.load(now)
            if bystanders is not None:
                bystanders.look()  # the term's first look: what the others are compared with
            return None
        self.follow()
        seen = self.look(bystanders=bystanders)
        self.follow_paused()
        return seen

    def apply(self, seen: refresh.Seen, now: datetime) -> Changes | None:
        """Take what a look saw at ``now``; returns what changed in the schedules (None:
        the look did not reread them)."""
        self.paused, self.overrides = seen.paused, seen.overrides
        self.was_paused |= seen.paused
        if seen.found is None:
            return None
        changes = self.catalog.apply(
            seen.found, now, lambda keys: schedule_records.last_ticks(keys, using=self.using)
        )
        # Only once applied: a look that failed half way is looked at again.
        self.signature = seen.signature
        return changes

    def follow(self) -> int:
        """Move the cursors past what the leader recorded since the last follow, and past
        the ticks paused schedules passed; returns how many rows were read."""
        rows = ledger.recorded_since(self.since, using=self.using)
        newest = self.catalog.follow(rows)
        if newest is not None and (self.followed_to is None or newest > self.followed_to):
            self.since, self.followed_to = newest - _MARGIN, newest
        paused = schedule_records.paused_ticks(using=self.using)
        self.catalog.passed(paused)
        self.was_paused.update(paused)
        return len(rows)

    def follow_paused(self) -> None:
        """Cursors of the schedules paused at some follow since, from their records (a
        pause lifted since the last follow passed ticks the follow did not see); called
        when taking the lease."""
        keys = sorted(self.was_paused)  # every look and follow adds what it saw paused
        self.was_paused = set()
        if not keys:
            return
        self.catalog.passed(schedule_records.last_ticks(keys, using=self.using))
