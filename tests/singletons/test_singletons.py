"""Singletons driven for real (threads, database) without runner processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db.models.functions import Now
from pydantic import BaseModel

from cluster_singletons import context
from cluster_singletons.cluster import leases, membership
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.errors import LeadershipLost, SingletonConfigError, SingletonError
from cluster_singletons.models import Lease, StateRecord, StepRecord
from cluster_singletons.singletons import registry
from cluster_singletons.singletons.driver import SingletonDriver
from cluster_singletons.singletons.singleton_context import SingletonContext
from project.demo.localcluster import poll

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.04}


class Count(BaseModel):
    n: int = 0


@pytest.fixture(autouse=True)
def _fast_retries(settings: Any) -> None:
    settings.CLUSTER_SINGLETONS = FAST


@pytest.fixture
def declared() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        registry.unregister(name)


def _declare(declared: list[str], name: str, **kwargs: Any) -> Callable[[Any], Any]:
    declared.append(name)
    return registry.singleton(name, **kwargs)


class Term:
    """A real leadership term of a singleton, run in a thread until ended."""

    def __init__(self, spec: registry.SingletonSpec) -> None:
        leases.ensure([spec.lease], using="default")
        runner = membership.register(host="t", pid=1, kind="runcluster", using="default")
        term = leases.acquire(spec.lease, runner, ttl=30, using="default")
        assert term is not None
        self.stop = threading.Event()
        self.leadership = Leadership(term=term, stop_event=self.stop, using="default", ttl=30)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(SingletonDriver(spec),))
        self.thread.start()

    def _run(self, driver: SingletonDriver) -> None:
        try:
            driver(self.leadership)
        except BaseException as exc:
            self.error = exc

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_a_name_registered_twice_by_different_functions_is_refused(declared: list[str]) -> None:
    @_declare(declared, "twice")
    def first(ctx: Any) -> None: ...

    with pytest.raises(SingletonConfigError, match="registered twice") as caught:

        @registry.singleton("twice")
        def second(ctx: Any) -> None: ...

    assert "'twice'" in str(caught.value) and "first" in str(caught.value)


def test_a_state_that_is_not_a_pydantic_model_is_refused_naming_the_singleton() -> None:
    with pytest.raises(SingletonConfigError, match=r"'reports'.*pydantic"):
        registry.singleton("reports", state=dict)  # type: ignore[arg-type]


def test_app_singletons_modules_are_discovered() -> None:
    assert {"indexer", "rates"} <= set(registry.registered())


def test_hooks_run_in_order_around_the_function(declared: list[str]) -> None:
    events: list[str] = []

    @_declare(
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

    @_declare(declared, "flaky")
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

    @_declare(declared, "bad", state=Count, on_lose_leadership=lambda ctx: lost.append(1))
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

    @_declare(declared, "periodic", state=Count, interval=0.05)
    def run(ctx: SingletonContext[Count]) -> None:
        ctx.save(Count(n=ctx.state.n + 1))
        calls.append(ctx.state.n)

    term = Term(registry.get("periodic"))
    poll("three iterations", lambda: len(calls) >= 3, timeout=10)
    term.end()
    assert calls[:3] == [1, 2, 3]


def test_async_singletons_run_and_see_the_cluster_context(declared: list[str]) -> None:
    seen: list[context.ClusterContext] = []

    @_declare(declared, "async")
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

    @_declare(declared, "handover", state=Count)
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


def test_a_finished_step_is_not_redone_by_the_next_leader(declared: list[str]) -> None:
    runs: list[int] = []
    results: list[Any] = []

    @_declare(declared, "steps")
    def run(ctx: SingletonContext[Any]) -> None:
        results.append(ctx.step("charge", lambda: runs.append(ctx.epoch) or {"charged": ctx.epoch}))
        ctx.sleep(10)

    spec = registry.get("steps")
    first = Term(spec)
    poll("the step", lambda: results, timeout=10)
    first.end()
    leases.release(first.leadership.term.runner_id, using="default")
    second = Term(spec)
    poll("the second leader's step", lambda: len(results) == 2, timeout=10)
    second.end()
    assert runs == [1]
    assert results == [{"charged": 1}, {"charged": 1}]
    assert StepRecord.objects.get().epoch == 1


def test_a_deposed_leader_cannot_record_a_step(declared: list[str]) -> None:
    outcome: list[BaseException] = []
    go = threading.Event()

    @_declare(declared, "late")
    def run(ctx: SingletonContext[Any]) -> None:
        go.wait(10)
        try:
            ctx.step("late", lambda: 1)
        except LeadershipLost as exc:
            outcome.append(exc)
            raise

    term = Term(registry.get("late"))
    Lease.objects.filter(name="singleton:late").update(expires_at=Now() - dt.timedelta(seconds=1))
    go.set()
    term.thread.join(10)
    assert isinstance(term.error, LeadershipLost) and outcome
    assert not StepRecord.objects.exists()


def test_a_step_recorded_meanwhile_wins_over_this_leaders_result(declared: list[str]) -> None:
    results: list[Any] = []

    def charge_twice(ctx: SingletonContext[Any]) -> str:
        StepRecord.objects.create(
            singleton=ctx.name, run_key="", name="charge", result='"first"', epoch=ctx.epoch
        )
        return "second"

    @_declare(declared, "raced")
    def run(ctx: SingletonContext[Any]) -> None:
        results.append(ctx.step("charge", lambda: charge_twice(ctx)))
        ctx.sleep(10)

    term = Term(registry.get("raced"))
    poll("the step", lambda: results, timeout=10)
    term.end()
    assert term.error is None and results == ["first"]
    assert StepRecord.objects.get().result == '"first"'


def test_a_leader_whose_lease_was_taken_cannot_record_a_step(declared: list[str]) -> None:
    go = threading.Event()

    @_declare(declared, "taken")
    def run(ctx: SingletonContext[Any]) -> None:
        go.wait(10)
        ctx.step("late", lambda: 1)

    term = Term(registry.get("taken"))
    Lease.objects.filter(name="singleton:taken").update(expires_at=Now() - dt.timedelta(seconds=1))
    other = membership.register(host="t", pid=2, kind="runcluster", using="default")
    assert leases.acquire("singleton:taken", other, ttl=30, using="default")
    go.set()
    term.thread.join(10)
    assert isinstance(term.error, LeadershipLost) and term.error.epoch == 1
    assert not StepRecord.objects.exists()


def test_a_step_result_must_be_json(declared: list[str]) -> None:
    errors: list[BaseException] = []

    @_declare(declared, "notjson")
    def run(ctx: SingletonContext[Any]) -> None:
        try:
            ctx.step("set", lambda: {1, 2})
        except TypeError as exc:
            errors.append(exc)
        ctx.sleep(10)

    term = Term(registry.get("notjson"))
    poll("the error", lambda: errors, timeout=10)
    term.end()
    assert "not JSON" in str(errors[0]) and not StepRecord.objects.exists()


def test_singleton_error_reasons_and_retryable_set() -> None:
    assert {"StateLoadFailed", "StatePersistFailed"} == SingletonError.RETRYABLE
    assert len(SingletonError.REASONS) == 5
    with pytest.raises(ValueError, match="unknown SingletonError reason"):
        SingletonError("Oops", "x")
