"""Singletons the multi-process tests and benchmarks run
(``CLUSTER_DEMO_SINGLETONS=spread,stubborn,hooks,many,counting``; ``many`` declares
``CLUSTER_DEMO_MANY`` idle singletons, 1,000 by default)."""

from __future__ import annotations

import logging
import os
import time

from pydantic import BaseModel

from cluster_singletons import SingletonContext, singleton

logger = logging.getLogger("project.demo.probes")
SPREAD = 9
COUNTING = 2


def idle(ctx: SingletonContext[BaseModel]) -> None:
    ctx.sleep(None)


class Counter(BaseModel):
    count: int = 0
    epoch: int = 0


def stubborn(ctx: SingletonContext[Counter]) -> None:
    """Save a counter every 50 ms, ignoring ``ctx.running``: only fencing can stop it."""
    while True:
        ctx.save(Counter(count=ctx.state.count + 1, epoch=ctx.epoch))
        time.sleep(0.05)


def counting(ctx: SingletonContext[Counter]) -> None:
    """Count in the durable state once per call, from the singleton's thread: a plain read
    (no transaction to roll back, so nothing but the driver replaces a dead connection),
    then a fenced save; its return records a heartbeat."""
    ctx.save(Counter(count=ctx.store.load().count + 1, epoch=ctx.epoch))


def _hook(event: str) -> object:
    return lambda ctx: logger.info("HOOK %s runner=%s epoch=%s", event, ctx.runner, ctx.epoch)


def hooked(ctx: SingletonContext[BaseModel]) -> None:
    logger.info("HOOK run runner=%s epoch=%s", ctx.runner, ctx.epoch)
    ctx.sleep(None)


def declare(groups: set[str]) -> None:
    if "spread" in groups:
        for i in range(SPREAD):
            singleton(f"spread-{i}")(idle)
    if "stubborn" in groups:
        singleton("stubborn", state=Counter)(stubborn)
    if "counting" in groups:
        for i in range(COUNTING):
            singleton(f"counting-{i}", state=Counter, interval=0.2)(counting)
    if "many" in groups:
        for i in range(int(os.environ.get("CLUSTER_DEMO_MANY", "1000"))):
            singleton(f"many-{i}")(idle)
    if "hooks" in groups:
        singleton(
            "hooks",
            on_become_leader=_hook("become"),
            on_lose_leadership=_hook("lose"),  # type: ignore[arg-type]
        )(hooked)
