"""The leader work of one singleton: hooks, calls, retries.

Lifecycle of one term, as the driver runs it:

1. ``on_become_leader(ctx)``.
2. The function, sync or ``async def``. Returning means "done for now": it is called again
   ``interval`` seconds later while still leading. Raising is logged and retried with
   capped exponential backoff, on a new connection if the error broke the old one (a
   database or pooler restart). ``SingletonError(SchemaDecodeFailed)`` stops it for the rest
   of the term (the lease stays held so no other runner loops on the same bad state).
3. ``on_lose_leadership(ctx)`` on every loss the runner observes: handoff, shutdown, lost
   renewal, refused fenced write.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from cluster_singletons import context, metrics
from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.cluster.leadership import Leadership, LeaderWork
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import (
    LeadershipLost,
    SingletonError,
    describe,
)
from cluster_singletons.pacing import Backoff
from cluster_singletons.singletons.registry import SingletonSpec, registered
from cluster_singletons.singletons.singleton_context import SingletonContext

logger = logging.getLogger("cluster_singletons.singletons")

STATE_REASONS = frozenset({"StateLoadFailed", "StatePersistFailed", "SchemaDecodeFailed"})


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
        # A connection the failure broke (a database or pooler restart) is replaced before
        # the failure is recorded and the function retried, whichever database it was.
        drop_if_unusable()
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
    return {spec.lease: SingletonDriver(spec) for spec in registered().values()}
