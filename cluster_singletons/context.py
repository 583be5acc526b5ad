"""The cluster context: who is running this code, for which singleton, in which term.

Held in a ``contextvars.ContextVar``, so each thread and each asyncio task sees its own.
The runner sets it around every singleton run; Celery tasks dispatched from inside carry
it in a message header and see it again while they run on the worker (see ``celery``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cluster_singletons.errors import ClusterContextRequired

#: Name of the Celery message header that carries the context.
HEADER = "cluster_context"


@dataclass(frozen=True, kw_only=True)
class ClusterContext:
    runner: int | None = None
    singleton: str | None = None
    is_leader: bool = False
    epoch: int | None = None
    schedule: str | None = None
    tick: str | None = None
    task_id: str | None = None

    def as_header(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_header(cls, data: object) -> ClusterContext | None:
        if not isinstance(data, dict):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_current: contextvars.ContextVar[ClusterContext | None] = contextvars.ContextVar(
    "cluster_singletons_context", default=None
)


def current() -> ClusterContext:
    """The context of the code running now; ``ClusterContextRequired`` outside one."""
    found = _current.get()
    if found is None:
        raise ClusterContextRequired()
    return found


def get() -> ClusterContext | None:
    """The current context, or None."""
    return _current.get()


@contextmanager
def within_cluster(**fields: Any) -> Iterator[ClusterContext]:
    """Scope a context: ``fields`` override those of the enclosing context, if any."""
    base = _current.get() or ClusterContext()
    scoped = dataclasses.replace(base, **fields)
    token = _current.set(scoped)
    try:
        yield scoped
    finally:
        _current.reset(token)


def activate(ctx: ClusterContext | None) -> contextvars.Token[ClusterContext | None]:
    """Set the context until ``deactivate(token)``; for hooks that cannot use ``with``."""
    return _current.set(ctx)


def deactivate(token: contextvars.Token[ClusterContext | None]) -> None:
    _current.reset(token)


class ClusterContextFilter(logging.Filter):
    """Adds ``cluster_runner``, ``cluster_singleton``, ``cluster_epoch``, ``cluster_leader``,
    ``cluster_schedule`` and ``cluster_tick`` to every record (None outside a context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get() or ClusterContext()
        record.cluster_runner = ctx.runner
        record.cluster_singleton = ctx.singleton
        record.cluster_epoch = ctx.epoch
        record.cluster_leader = ctx.is_leader
        record.cluster_schedule = ctx.schedule
        record.cluster_tick = ctx.tick
        return True
