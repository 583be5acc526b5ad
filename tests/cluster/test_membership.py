"""The runner registry against the real database."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from cluster_singletons.cluster import fencing, leases, membership
from cluster_singletons.models import Runner

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

USING = "default"


def _register(host: str = "node") -> int:
    return membership.register(host=host, pid=1, kind="runcluster", using=USING)


def _age(runner_id: int, seconds: float) -> None:
    Runner.objects.filter(pk=runner_id).update(last_seen=Now() - dt.timedelta(seconds=seconds))


def test_registrations_get_ids_never_reused_and_a_touch_needs_the_row() -> None:
    first = _register()
    membership.deregister(first, using=USING)
    second = _register()
    assert second > first
    assert membership.touch(second, using=USING)
    assert not membership.touch(first, using=USING), "a deleted registration is not revived"


@pytest.mark.parametrize("returning", [True, False], ids=["update-returning", "update-then-read"])
def test_a_touch_returns_the_database_clock_it_wrote_and_stores_the_offset(
    returning: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not returning:  # as on a backend without UPDATE ... RETURNING
        monkeypatch.setattr(membership, "RETURNING", frozenset())
    runner = _register()
    before = fencing.database_now(USING)
    with CaptureQueriesContext(connection) as statements:
        seen = membership.touch(runner, clock_offset=-30.25, using=USING)
    after = fencing.database_now(USING)
    row = Runner.objects.get(pk=runner)
    assert seen is not None and before <= seen <= after
    assert row.clock_offset == -30.25
    assert len(statements) == (1 if returning else 2)
    if returning:
        assert row.last_seen == seen
    membership.deregister(runner, using=USING)
    assert membership.touch(runner, using=USING) is None


def test_only_registrations_not_seen_for_long_are_forgotten() -> None:
    old, fresh = _register("old"), _register("fresh")
    _age(old, 7200)
    assert membership.forget_stale(older_than=3600, using=USING) == 1
    assert [r.id for r in membership.rows(using=USING)] == [fresh]


def test_the_live_view_counts_the_placed_leases_each_live_runner_holds() -> None:
    a, b, stopping, stale = (_register(h) for h in ("a", "b", "stopping", "stale"))
    membership.mark_stopping(stopping, using=USING)
    _age(stale, 60)
    leases.ensure(["singleton:x", "singleton:y", "beat"], using=USING)
    leases.acquire("singleton:x", a, ttl=30, using=USING)
    leases.acquire("singleton:y", a, ttl=30, using=USING)
    leases.acquire("beat", b, ttl=30, using=USING)
    view = membership.live_view(
        ttl=30, lease_prefix="singleton:", crash_detection=False, using=USING
    )
    assert view == {a: 2, b: 0}


def test_rows_say_whose_postgresql_session_is_gone() -> None:
    alive, dead, unlocked = _register("alive"), _register("dead"), _register("unlocked")
    for runner in (alive, dead):
        membership.set_crash_detection(runner, lock=True, how="session", using=USING)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # this session holds the live runner's lock
            cursor.execute(
                "SELECT pg_advisory_lock(%s, %s)", [membership.LIVENESS_LOCK_NAMESPACE, alive]
            )
    try:
        gone = {r.id: r.session_gone for r in membership.rows(using=USING)}
    finally:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock_all()")
    dead_gone = connection.vendor == "postgresql"
    assert gone == {alive: False, dead: dead_gone, unlocked: False}
