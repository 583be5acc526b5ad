"""Singletons driven for real (threads, database) without runner processes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cluster_singletons import context
from cluster_singletons.cluster import leases
from cluster_singletons.errors import SingletonError
from cluster_singletons.models import Heartbeat, StateRecord
from cluster_singletons.singletons import registry
from cluster_singletons.singletons.singleton_context import SingletonContext
from project.demo.localcluster import poll
from tests.singletons.helpers import Count, Term, declare
from tests.tcpproxy import end_session

pytestmark = [
    pytest.mark.db,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fast_retries"),
]


def test_hooks_run_in_order_around_the_function(declared: list[str]) -> None:
    events: list[str] = []

    @declare(
        declared,
        "hooks",
        on_become_leader=lambda ctx: events.append(f"become {ctx.epoch}"),
        on_lose_leadership=lambda ctx: events.append(f"lose {ctx.epoch}"),
    )
    def run(ctx: SingletonContext[Any]) -> None:
        events.append("run")
        while ctx.sleep(10):
            pass
        events.append("stopped")

    term = Term(registry.get("hooks"))
    poll("the function to run", lambda: "run" in events, timeout=10)
    term.end()
    assert events == ["become 1", "run", "stopped", "lose 1"]


def test_a_raising_function_is_retried_with_backoff_while_leading(declared: list[str]) -> None:
    calls: list[float] = []

    @declare(declared, "flaky")
    def run(ctx: Any) -> None:
        calls.append(1)
        if len(calls) < 4:
            raise RuntimeError("transient")
        ctx.sleep(10)

    term = Term(registry.get("flaky"))
    poll("four calls", lambda: len(calls) == 4, timeout=10)
    term.end()
    assert term.error is None


def test_schema_decode_failure_stops_the_singleton_without_a_restart_loop(
    declared: list[str],
) -> None:
    StateRecord.objects.create(key="singleton:bad", value="not json", schema_version=1)
    calls: list[int] = []
    lost: list[int] = []

    @declare(declared, "bad", state=Count, on_lose_leadership=lambda ctx: lost.append(1))
    def run(ctx: SingletonContext[Count]) -> None:
        calls.append(ctx.state.n)

    term = Term(registry.get("bad"))
    poll(
        "the state to be quarantined",
        lambda: StateRecord.objects.get(key="singleton:bad").status == "quarantined",
        timeout=10,
    )
    assert term.thread.is_alive(), "it keeps the lease, idle, so no one else loops on it"
    term.end()
    assert calls == [] and lost == [1]


def test_a_function_that_returns_is_called_again_after_its_interval(declared: list[str]) -> None:
    calls: list[int] = []

    @declare(declared, "periodic", state=Count, interval=0.05)
    def run(ctx: SingletonContext[Count]) -> None:
        ctx.save(Count(n=ctx.state.n + 1))
        calls.append(ctx.state.n)

    term = Term(registry.get("periodic"))
    poll("three iterations", lambda: len(calls) >= 3, timeout=10)
    term.end()
    assert calls[:3] == [1, 2, 3]


def test_async_singletons_run_and_see_the_cluster_context(declared: list[str]) -> None:
    seen: list[context.ClusterContext] = []

    @declare(declared, "async")
    async def run(ctx: SingletonContext[Any]) -> None:
        await asyncio.sleep(0)
        seen.append(context.current())
        ctx.sleep(10)

    term = Term(registry.get("async"))
    poll("the coroutine", lambda: seen, timeout=10)
    term.end()
    assert seen[0].singleton == "async" and seen[0].is_leader and seen[0].epoch == 1


def test_state_saved_by_one_leader_is_what_the_next_leader_loads(declared: list[str]) -> None:
    loaded: list[int] = []

    @declare(declared, "handover", state=Count)
    def run(ctx: SingletonContext[Count]) -> None:
        loaded.append(ctx.state.n)
        ctx.save(Count(n=ctx.state.n + 10))
        ctx.sleep(10)

    spec = registry.get("handover")
    first = Term(spec)
    poll(
        "the first leader's save",
        lambda: StateRecord.objects.filter(key=spec.lease).exists(),
        timeout=10,
    )
    first.end()
    leases.release(first.leadership.term.runner_id, using="default")
    second = Term(spec)
    poll("the second leader", lambda: len(loaded) == 2, timeout=10)
    second.end()
    assert loaded == [0, 10]


def _heartbeat(name: str) -> Heartbeat | None:
    return Heartbeat.objects.filter(name=f"singleton:{name}").first()


@pytest.mark.postgres
def test_a_singleton_whose_session_the_server_ended_reconnects_on_its_next_call(
    declared: list[str],
) -> None:
    calls: list[int] = []

    @declare(declared, "restarted", state=Count, interval=0.01)
    def run(ctx: SingletonContext[Count]) -> None:
        calls.append(1)
        if len(calls) == 2:
            end_session()  # the database restarts while the singleton runs
        ctx.store.load()  # a plain read: no transaction whose rollback would drop it

    term = Term(registry.get("restarted"))
    try:
        poll(
            "calls after the restart",
            lambda: (b := _heartbeat("restarted")) and b.executions >= 3,
            timeout=10,
        )
    finally:
        term.end()
    row = _heartbeat("restarted")
    assert row is not None and row.failures == 1, "one failure, recorded once reconnected"
    assert "StateLoadFailed" in row.last_error


@pytest.mark.postgres
def test_a_heartbeat_that_met_an_ended_session_leaves_a_fresh_one_to_the_next(
    declared: list[str],
) -> None:
    calls: list[int] = []

    @declare(declared, "beating")
    def run(ctx: SingletonContext[Any]) -> None:
        calls.append(1)
        if len(calls) == 1:
            end_session()
            ctx.heartbeat()  # HeartbeatFailed: logged and counted, not raised
            return  # the execution's own heartbeat follows at once
        ctx.sleep(None)

    term = Term(registry.get("beating"))
    try:
        row = poll("the execution's heartbeat", lambda: _heartbeat("beating"), timeout=10)
    finally:
        term.end()
    assert (row.executions, row.failures) == (1, 0)


def test_singleton_error_reasons_and_retryable_set() -> None:
    assert {"StateLoadFailed", "StatePersistFailed"} == SingletonError.RETRYABLE
    assert len(SingletonError.REASONS) == 5
    with pytest.raises(ValueError, match="unknown SingletonError reason"):
        SingletonError("Oops", "x")
