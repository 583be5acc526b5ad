"""Resumable steps: once per (singleton, run, step) across leaders, fenced on the term."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from django.db.models.functions import Now

from cluster_singletons.cluster import leases, membership
from cluster_singletons.errors import LeadershipLost
from cluster_singletons.models import Lease, StepRecord
from cluster_singletons.singletons import registry
from cluster_singletons.singletons.singleton_context import SingletonContext
from project.demo.localcluster import poll
from tests.singletons.helpers import Term, declare

pytestmark = [
    pytest.mark.db,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fast_retries"),
]


def test_a_finished_step_is_not_redone_by_the_next_leader(declared: list[str]) -> None:
    runs: list[int] = []
    results: list[Any] = []

    @declare(declared, "steps")
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

    @declare(declared, "late")
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

    @declare(declared, "raced")
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

    @declare(declared, "taken")
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

    @declare(declared, "notjson")
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
