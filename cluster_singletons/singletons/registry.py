"""Cluster singletons: functions that run on exactly one runner at a time.

``@singleton("name", state=Model)`` records a ``SingletonSpec`` at import time; runners
stand for the lease ``singleton:<name>`` and, while they lead it, drive the function with
a ``SingletonContext``. Discovery: each installed app's ``singletons`` module is imported
by ``AppConfig.ready()``, as the admin does with ``admin`` modules.

Lifecycle of one term, as the driver runs it:

1. ``on_become_leader(ctx)``.
2. The function, sync or ``async def``. Returning means "done for now": it is called again
   ``interval`` seconds later while still leading. Raising is logged and retried with
   capped exponential backoff. ``SingletonError(SchemaDecodeFailed)`` stops it for the rest
   of the term (the lease stays held so no other runner loops on the same bad state).
3. ``on_lose_leadership(ctx)`` on every loss the runner observes: handoff, shutdown, lost
   renewal, refused fenced write.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import DatabaseError, connections
from pydantic import BaseModel

from cluster_singletons import context, metrics
from cluster_singletons.cluster import fencing, heartbeats
from cluster_singletons.cluster.leadership import Leadership, LeaderWork
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import (
    LeadershipLost,
    SingletonConfigError,
    SingletonError,
    UnknownSingleton,
    describe,
)
from cluster_singletons.models import StepRecord
from cluster_singletons.pacing import Backoff
from cluster_singletons.singletons import state_versions
from cluster_singletons.singletons.state import StateStore

logger = logging.getLogger("cluster_singletons.singletons")

LEASE_PREFIX = "singleton:"
STATE_REASONS = frozenset({"StateLoadFailed", "StatePersistFailed", "SchemaDecodeFailed"})
M = TypeVar("M", bound=BaseModel)
Hook = Callable[["SingletonContext[Any]"], Any]


class _NoState(BaseModel):
    """The state of a singleton declared without one."""


@dataclass(frozen=True, kw_only=True)
class SingletonSpec:
    name: str
    fn: Callable[..., Any]
    state: type[BaseModel]
    interval: float
    on_become_leader: Hook | None
    on_lose_leadership: Hook | None

    @property
    def lease(self) -> str:
        return LEASE_PREFIX + self.name


_registry: dict[str, SingletonSpec] = {}


def singleton(
    name: str,
    *,
    state: type[BaseModel] | None = None,
    interval: float = 60.0,
    on_become_leader: Hook | None = None,
    on_lose_leadership: Hook | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare ``fn(ctx)`` a cluster singleton named ``name``.

    ``interval``: a function that returns is called again this many seconds later, and a
    heartbeat is expected at least this often.
    """
    if not name or not isinstance(name, str) or len(LEASE_PREFIX + name) > 200:
        raise SingletonConfigError(str(name), "name must be a non-empty string of <= 190 chars")
    found = state_versions.problems(state) if state is not None else []
    if found:
        raise SingletonConfigError(name, "; ".join(found))
    if interval <= 0:
        raise SingletonConfigError(name, f"interval must be > 0, not {interval!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _registry.get(name)
        if existing is not None and _qualname(existing.fn) != _qualname(fn):
            raise SingletonConfigError(
                name, f"registered twice: by {_qualname(existing.fn)} and by {_qualname(fn)}"
            )
        _registry[name] = SingletonSpec(
            name=name,
            fn=fn,
            state=state or _NoState,
            interval=interval,
            on_become_leader=on_become_leader,
            on_lose_leadership=on_lose_leadership,
        )
        return fn

    return register


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def registered() -> Mapping[str, SingletonSpec]:
    return dict(_registry)


def get(name: str) -> SingletonSpec:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownSingleton(name, sorted(_registry)) from None


def unregister(name: str) -> None:
    """Forget a singleton (tests)."""
    _registry.pop(name, None)


class SingletonContext(Generic[M]):
    """What a singleton function receives; valid for one leadership term."""

    def __init__(self, spec: SingletonSpec, leadership: Leadership, run_key: str = "") -> None:
        self.spec = spec
        self.name = spec.name
        self._leadership = leadership
        self.run_key = run_key
        self.store: StateStore[Any] = StateStore(
            f"singleton:{spec.name}", spec.state, term=leadership.term, owner=spec.name
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
        records = StepRecord.objects.using(self.store.using)
        found = (
            records.filter(singleton=self.name, run_key=run_key, name=name)
            .values_list("result", flat=True)
            .first()
        )
        if found is not None:
            return json.loads(found)
        result = fn()
        try:
            text = json.dumps(result)
        except TypeError as exc:
            raise TypeError(
                f"step {name!r} of singleton {self.name!r}: result is not JSON: {exc}"
            ) from exc
        leadership, using = self._leadership, self.store.using
        params: list[str | int] = [self.name, run_key, name, text, self.epoch]
        params += fencing.fence_params(leadership.term)
        with (
            fencing.statement_fence(leadership.term, using=using, ttl=leadership.ttl),
            connections[using].cursor() as cursor,
        ):
            cursor.execute(_record_step_sql(using), params)
            written = cursor.rowcount
        if written == 1:
            return result
        fencing.ensure_held(leadership.term, using=using)
        # Still leading, so the statement met a record of the same step: that one stands.
        recorded = records.get(singleton=self.name, run_key=run_key, name=name).result
        return json.loads(recorded)


@functools.cache
def _record_step_sql(using: str) -> str:
    """Built once per database alias; ``recorded_at`` takes its default, the database's clock."""
    columns = ("singleton", "run_key", "name", "result", "epoch")
    return fencing.insert_sql(connections[using], StepRecord, columns, fenced=True)


class SingletonDriver:
    """The leader work of one singleton: hooks, calls, retries; see the module docstring."""

    def __init__(self, spec: SingletonSpec) -> None:
        self.spec = spec

    def __call__(self, leadership: Leadership) -> None:
        spec = self.spec
        ctx: SingletonContext[Any] = SingletonContext(spec, leadership)
        scope = context.within_cluster(
            runner=leadership.term.runner_id,
            singleton=spec.name,
            is_leader=True,
            epoch=leadership.term.epoch,
        )
        with scope:
            try:
                if spec.on_become_leader is not None:
                    _call(spec.on_become_leader, ctx)
                self._loop(ctx)
            finally:
                if spec.on_lose_leadership is not None:
                    try:
                        _call(spec.on_lose_leadership, ctx)
                    except Exception:
                        logger.exception("on_lose_leadership of %r failed", spec.name)

    def _loop(self, ctx: SingletonContext[Any]) -> None:
        settings = get_settings()
        backoff = Backoff.from_settings(settings)
        while ctx.running:
            started = time.monotonic()
            try:
                _call(self.spec.fn, ctx)
            except LeadershipLost:
                raise
            except SingletonError as exc:
                self._failed(ctx, exc.reason, describe(exc), started)
                if not exc.retryable:
                    logger.error("singleton %r stopped for this term: %s", self.spec.name, exc)
                    ctx.sleep(None)
                    return
                logger.warning(
                    "singleton %r: %s; retrying in %.1fs", self.spec.name, exc, backoff.delay
                )
            except Exception as exc:
                self._failed(ctx, type(exc).__name__, describe(exc), started)
                logger.exception(
                    "singleton %r raised; retrying in %.1fs", self.spec.name, backoff.delay
                )
            else:
                ctx.last_heartbeat = time.monotonic()
                ctx._record(duration=ctx.last_heartbeat - started)
                backoff = backoff.reset()
                ctx.sleep(self.spec.interval)
                continue
            ctx._state = None  # reload: the failure may have left the cache ahead of the row
            ctx.sleep(backoff.delay)
            backoff = backoff.failed()

    def _failed(self, ctx: SingletonContext[Any], reason: str, text: str, started: float) -> None:
        metrics.ERRORS.labels(self.spec.name, reason).inc()
        if reason in STATE_REASONS:
            metrics.STATE_ERRORS.labels(self.spec.name, reason).inc()
        ctx._record(error=f"{reason}: {text}", duration=time.monotonic() - started)


def _call(fn: Callable[..., Any], ctx: SingletonContext[Any]) -> Any:
    result = fn(ctx)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def work() -> dict[str, LeaderWork]:
    """Leader work for every registered singleton, keyed by lease name."""
    return {spec.lease: SingletonDriver(spec) for spec in _registry.values()}
