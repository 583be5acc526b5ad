"""What a singleton function receives: ``SingletonContext``, valid for one leadership term.

It reads and writes the singleton's durable state (fenced on the term), records
heartbeats, runs resumable steps (``steps``), and sleeps until the term ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from django.db import DatabaseError
from pydantic import BaseModel

from cluster_singletons import metrics
from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.cluster import heartbeats
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.errors import (
    SingletonError,
)
from cluster_singletons.singletons import steps
from cluster_singletons.singletons.registry import SingletonSpec
from cluster_singletons.singletons.state import StateStore

logger = logging.getLogger("cluster_singletons.singletons")

M = TypeVar("M", bound=BaseModel)


class SingletonContext(Generic[M]):
    """What a singleton function receives; valid for one leadership term."""

    def __init__(self, spec: SingletonSpec, leadership: Leadership, run_key: str = "") -> None:
        self.spec = spec
        self.name = spec.name
        self._leadership = leadership
        self.run_key = run_key
        self.store: StateStore[Any] = StateStore(
            spec.lease, spec.state, term=leadership.term, owner=spec.name
        )
        self._state: M | None = None
        self.logger = logging.LoggerAdapter(
            logging.getLogger(f"cluster_singletons.singletons.{spec.name}"),
            {"singleton": spec.name},
        )
        self.last_heartbeat: float | None = None

    @property
    def running(self) -> bool:
        """False once leadership is lost or shutdown begins."""
        return self._leadership.running

    def sleep(self, seconds: float | None) -> bool:
        """Sleep (``None``: until the term ends), waking at once on lost leadership or
        shutdown; return ``running``."""
        return self._leadership.sleep(seconds)

    @property
    def epoch(self) -> int:
        return self._leadership.term.epoch

    @property
    def runner(self) -> int:
        return self._leadership.term.runner_id

    @property
    def state(self) -> M:
        """The durable state, loaded on first use (the model's defaults when none is stored)."""
        if self._state is None:
            self._state = self.store.load()
        return self._state

    def save(self, value: M) -> None:
        """Store ``value`` (compare-and-swap, fenced on this term)."""
        self.store.save(value)
        self._state = value

    def modify(self, fn: Callable[[M], M]) -> M:
        """Atomically replace the state with ``fn(state)``; return the new value."""
        self._state = self.store.modify(fn)
        return self._state

    def heartbeat(self) -> None:
        """Record that the singleton is alive and making progress (in the database at most
        once a second; ``HeartbeatFailed`` is logged and counted, never raised)."""
        now = time.monotonic()
        if self.last_heartbeat is not None and now - self.last_heartbeat < 1.0:
            return
        self.last_heartbeat = now
        self._record()

    def _record(self, error: str | None = None, duration: float | None = None) -> None:
        term = self._leadership.term
        try:
            heartbeats.record(
                self.spec.lease,
                runner_id=term.runner_id,
                epoch=term.epoch,
                interval=self.spec.interval,
                error=error,
                duration=duration,
                using=self.store.using,
            )
        except DatabaseError as exc:
            drop_if_unusable(self.store.using)
            metrics.ERRORS.labels(self.name, "HeartbeatFailed").inc()
            logger.warning(
                "singleton %r: %s", self.name, SingletonError("HeartbeatFailed", self.name, exc)
            )

    def step(self, name: str, fn: Callable[[], Any], *, run: str | None = None) -> Any:
        """Run ``fn`` once per (singleton, run, ``name``) across leaders; return its result.

        The JSON result is recorded fenced on this term, in one statement; a later leader
        reaching the same step gets the recorded result without calling ``fn``. If a leader
        dies after ``fn`` ran but before the record committed, the next leader runs ``fn``
        again. Raises ``LeadershipLost`` (nothing recorded) once the term is over.
        """
        run_key = self.run_key if run is None else run
        using = self.store.using
        found = steps.recorded(self.name, run_key, name, using=using)
        if found is not None:
            return json.loads(found)
        result = fn()
        try:
            text = json.dumps(result)
        except TypeError as exc:
            raise TypeError(
                f"step {name!r} of singleton {self.name!r}: result is not JSON: {exc}"
            ) from exc
        leadership = self._leadership
        if steps.record(
            self.name, run_key, name, text, term=leadership.term, ttl=leadership.ttl, using=using
        ):
            return result
        # Still leading, so the statement met a record of the same step: that one stands.
        recorded = steps.recorded(self.name, run_key, name, using=using)
        assert recorded is not None
        return json.loads(recorded)
