"""A schedule, whatever its source, in one shape: what to run (a Celery task, or an
in-runner ``@cron`` function), when (a timetable) and the beat's options for it.

A schedule that cannot be computed (bad cron expression, unknown zone or task name) is
still a ``Schedule``, with ``problem`` set and no timetable: the beat flags it and
schedules everything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from cluster_singletons._registration import qualname
from cluster_singletons.beat.timetables import Timetable
from cluster_singletons.names import Overlap


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """One schedule, whatever its source. ``fn`` is set for in-runner ``@cron`` functions,
    ``task`` (a Celery task name) for everything else."""

    key: str
    source: Literal["periodic", "beat", "cron"]
    timetable: Timetable | None
    task: str = ""
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    skip_if_older_than: float | None = None
    overlap: Overlap | None = None
    from_previous: bool = False
    one_off: bool = False
    enabled: bool = True
    start_time: datetime | None = None
    expires: datetime | None = None
    problem: str = ""
    #: When the schedule was last edited, if its source knows; ticks start after it.
    changed_at: datetime | None = field(default=None, compare=False)
    #: The source's own record of the last run (django-celery-beat's ``last_run_at``).
    last_run_at: datetime | None = field(default=None, compare=False)
    #: The source row this was built from, to skip rebuilding unchanged ones.
    source_row: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.key.partition(":")[2]

    @cached_property
    def fingerprint(self) -> str:
        """Changes when anything that decides ticks or messages changes."""
        parts = [
            self.key,
            repr(self.timetable),
            self.task,
            qualname(self.fn) if self.fn else "",
            json.dumps([self.args, self.kwargs, self.options], sort_keys=True, default=str),
            repr(
                (
                    self.skip_if_older_than,
                    self.overlap,
                    self.from_previous,
                    self.one_off,
                    self.enabled,
                    self.start_time,
                    self.expires,
                    self.problem,
                )
            ),
        ]
        return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()

    def first_tick_after(self, after: datetime) -> datetime | None:
        """The first tick after ``after`` that this schedule runs, honouring start and expiry."""
        if self.timetable is None or not self.enabled:
            return None
        if self.start_time is not None and after < self.start_time:
            after = self.start_time - timedelta(microseconds=1)
        tick = self.timetable.next_after(after)
        if tick is None or (self.expires is not None and tick > self.expires):
            return None
        return tick


@dataclass(frozen=True, kw_only=True)
class Override:
    """An operator's settings for one schedule (its record in the admin); they win over
    the schedule's own options and the settings' defaults."""

    overlap: Overlap | None = None
    skip_if_older_than: float | None = None
