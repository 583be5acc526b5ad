"""Two deployments sharing one database under different ``key_prefix`` values: each
dispatches every tick of its own same-named schedule and sees none of the other's rows."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from celery import Celery
from django.test import override_settings

from cluster_singletons import control, names
from cluster_singletons.beat import deliveries, ledger, schedule_records
from cluster_singletons.beat.engine import BeatEngine
from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster import heartbeats, leases, membership
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.conf import get_settings
from cluster_singletons.health.report import cluster_health
from cluster_singletons.models import Delivery, Heartbeat, Run, ScheduleRecord
from tests.beat.test_engine import T0, _drain

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@contextmanager
def _as(prefix: str) -> Iterator[None]:
    with override_settings(CLUSTER_SINGLETONS={"key_prefix": prefix, "overlap": "allow_all"}):
        yield


class _Deployment:
    """A leader of one deployment's beat (its prefixed lease), driven by a frozen clock."""

    def __init__(self, app: Celery, prefix: str) -> None:
        self.prefix = prefix
        lease = names.prefixed(names.BEAT, prefix)
        with _as(prefix):
            leases.ensure([lease], using="default")
            runner = membership.register(host=prefix or "-", pid=1, kind="beat", using="default")
            term = leases.acquire(lease, runner, ttl=30, using="default")
            assert term is not None
            self.leadership = Leadership(
                term=term, stop_event=threading.Event(), using="default", ttl=30
            )
            self.clock = FrozenClock(wall=T0)
            self.engine = BeatEngine(app, clock=self.clock, settings=get_settings())
            self.engine.start(self.leadership)

    def at(self, seconds: float) -> None:
        with _as(self.prefix):
            self.clock.advance((T0 + timedelta(seconds=seconds) - self.clock.now()).total_seconds())
            self.engine.step(self.leadership)


@pytest.mark.parametrize("prefixes", [("a:", "b:"), ("", "b:")])
def test_two_deployments_each_publish_every_tick_of_a_same_named_schedule(
    app: Celery, prefixes: tuple[str, str]
) -> None:
    app.conf.beat_schedule = {"ten": {"task": "t.tick", "schedule": 10, "args": ["ten"]}}
    first, second = (_Deployment(app, p) for p in prefixes)
    for second_ in range(1, 61):
        first.at(second_)
        second.at(second_)
    ticks = [T0 + timedelta(seconds=s) for s in range(10, 61, 10)]
    published = Counter(h["id"] for h in _drain(app))
    for prefix in prefixes:
        expected = {ledger.task_id(prefix + "beat:ten", tick) for tick in ticks}
        assert {i: published[i] for i in expected} == dict.fromkeys(expected, 1), prefix
    assert sum(published.values()) == 12
    for prefix in prefixes:
        with _as(prefix):
            assert ledger.covered("beat:ten", T0, ticks[-1], using="default") == [
                (t, t) for t in ticks
            ]
            assert ledger.pending_count(using="default") == 0
            assert schedule_records.last_ticks(["beat:ten"], using="default") == {
                "beat:ten": ticks[-1]
            }
            assert set(heartbeats.by_name(using="default")) == {"beat"}
            assert [r.host for r in membership.rows(using="default")] == [prefix or "-"]
            report = cluster_health()
            beat = next(i for i in report.items if i.name == "beat")
            assert (report.runners, beat.leader) == (1, membership.rows(using="default")[0].id)
    assert Run.objects.count() == 12
    assert set(ScheduleRecord.objects.values_list("key", flat=True)) == {
        p + "beat:ten" for p in prefixes
    }
    assert set(Heartbeat.objects.values_list("name", flat=True)) == {p + "beat" for p in prefixes}


def test_operators_act_on_their_own_deployment_only(app: Celery) -> None:
    app.conf.beat_schedule = {"ten": {"task": "t.tick", "schedule": 10, "args": ["ten"]}}
    first, second = _Deployment(app, "a:"), _Deployment(app, "b:")
    with _as("a:"), override_settings(CELERY_BEAT_SCHEDULE=None):
        sig = app.signature("t.tick", args=("later",), queue="beat-test")
        delivery = deliveries.deliver_at(sig, T0 + timedelta(seconds=5))
        schedule_records.set_paused("beat:ten", "a pauses", using="default")
    second.at(5)
    assert _drain(app) == [], "b dispatches neither a's delivery nor anything else yet"
    first.at(5)
    assert [h["cluster_context"]["schedule"] for h in _drain(app)] == [f"delivery:{delivery}"]
    assert Delivery.objects.get().key_prefix == "a:"
    first.at(10)
    second.at(10)
    (only,) = _drain(app)
    assert only["id"] == ledger.task_id("b:beat:ten", T0 + timedelta(seconds=10)), "a paused"
    with _as("b:"):
        assert control.prune(0) == 1
    assert not Run.objects.filter(schedule="b:beat:ten").exists()
    assert Run.objects.filter(schedule__startswith="a:").exists()
