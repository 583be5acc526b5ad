"""The leader-elected beat with real ``celery beat`` processes, a real database and the
configured broker: every tick is dispatched once while leaders are killed and paused.

What is counted is what the broker holds at the end, read back message by message.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from cluster_singletons.models import Run
from project.celery import app as project_app
from project.demo.localcluster import Cluster, Leader, database_url, poll, received
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.multiprocess, pytest.mark.django_db(transaction=True)]

#: Fast leases. No worker runs here, so no run ever reports finished: the default overlap
#: policy dispatches regardless.
SETTINGS = {
    "lease_ttl": 2.0,
    "renew_interval": 0.5,
    "acquire_interval": 0.1,
    "beat_refresh_interval": 1.0,
}


def _chaos(cluster: Cluster, seconds: float, signals: list[signal.Signals]) -> int:
    """Every ~10 s kill or pause the beat leader; keep three beats. Returns the kills."""
    rng = random.Random(7)
    deadline = time.monotonic() + seconds
    disruptions = 0
    last: Leader | None = None
    while time.monotonic() < deadline:
        time.sleep(min(rng.uniform(8, 12), max(0.0, deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            break
        # Not the one disrupted last: behind a pooler its lease outlives it by the TTL.
        leader = last = cluster.wait_for_leader(other_than=last)
        how = signals[disruptions % len(signals)]
        cluster.signal(leader.pid, how)
        disruptions += 1
        _replace(cluster, leader, how)
    return disruptions


def _replace(cluster: Cluster, leader: Leader, how: signal.Signals) -> None:
    if how == signal.SIGKILL:
        cluster.node(leader.pid).process.wait(10)
        cluster.start(1, beat=True)
        return
    # SIGSTOP: resume the old leader once another took over; it must act as a standby.
    try:
        cluster.wait_for_leader(other_than=leader, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()[-12000:]}") from exc
    finally:
        os.kill(leader.pid, signal.SIGCONT)


@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
def test_every_tick_is_dispatched_once_while_leaders_die(
    via: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Three beats on the database directly with fast leases, or through PgBouncer in
    transaction mode with the default settings (no worker runs: dispatch regardless)."""
    if via == "direct":
        cluster = Cluster(tmp_path, SETTINGS)
    else:
        url = database_url(port=request.getfixturevalue("pgbouncer").port)
        cluster = Cluster(tmp_path, {}, env={"DATABASE_URL": url})
    request.addfinalizer(cluster.stop)
    queue = f"chaos-{uuid.uuid4().hex[:8]}"
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    minute = CrontabSchedule.objects.create(minute="*", timezone="UTC")
    PeriodicTask.objects.create(name="each-second", task="demo.ping", interval=every, queue=queue)
    PeriodicTask.objects.create(name="each-minute", task="demo.ping", crontab=minute, queue=queue)
    postgres = connection.vendor == "postgresql"
    seconds = 130.0 if postgres else 45.0
    signals = [signal.SIGKILL, signal.SIGSTOP] if postgres else [signal.SIGKILL]

    cluster.start(3, beat=True)
    cluster.wait_for_leader()
    poll("the first dispatch", lambda: Run.objects.exists(), timeout=30)
    window_start = datetime.now(UTC) + timedelta(seconds=2)
    disruptions = _chaos(cluster, seconds, signals)
    window_end = datetime.now(UTC) - timedelta(seconds=2)
    _wait_published_through(window_end)
    cluster.stop()

    by_id, runs = _each_tick_once(
        cluster,
        queue,
        window_start,
        window_end,
        {"periodic:each-second": 1, "periodic:each-minute": 60},
    )
    # A message published twice (a leader died between publishing and marking it) carries
    # the same task id both times, so consumers can tell; it cannot happen more often
    # than leaders were disrupted.
    repeats = sum(n - 1 for n in by_id.values())
    assert repeats <= disruptions, by_id.most_common(3)
    # Behind the pooler a takeover waits for the default TTL (10 s) after each disruption.
    assert disruptions >= (5 if via == "pgbouncer" else 10 if postgres else 3)
    assert "Traceback" not in cluster.logs(), cluster.logs()[-6000:]
    each_second = sum(1 for r in runs.values() if r.schedule == "periodic:each-second")
    print(f"chaos {via}: {disruptions} disruptions, {repeats} repeats, {each_second} runs")
    # Ticks missed during a takeover are coalesced into one run: fewer runs, longer ones.
    assert each_second >= seconds / (4 if via == "pgbouncer" else 2)


def _wait_published_through(moment: datetime) -> None:
    """Until the every-second schedule's tick at ``moment`` (or a later one) is published."""
    poll(
        f"the tick of {moment.isoformat()} to be published",
        lambda: Run.objects.filter(
            schedule="periodic:each-second", tick__gte=moment, published_at__isnull=False
        ).exists(),
        timeout=60,
    )


def _each_tick_once(
    cluster: Cluster, queue: str, start: datetime, end: datetime, steps: dict[str, int]
) -> tuple[Counter[str], dict[str, Run]]:
    """Read back what the broker holds; assert every tick of each schedule (key -> seconds
    between ticks) from ``start`` to ``end`` was dispatched (alone or coalesced) or skipped
    by policy, and none twice. Returns the messages per task id and their ledger rows."""
    messages = received(project_app, queue, wait=1.0)
    by_id = Counter(m["id"] for m in messages)
    runs = {r.task_id: r for r in Run.objects.filter(task_id__in=list(by_id))}
    assert set(runs) == set(by_id), "every message received is a ledger run"
    skipped = list(Run.objects.filter(status=Run.Status.SKIPPED))
    for key, step in steps.items():
        covered: Counter[datetime] = Counter()
        for run in [r for r in [*runs.values(), *skipped] if r.schedule == key]:
            first = run.first_tick or run.tick
            covered.update(first + timedelta(seconds=step * i) for i in range(run.ticks))
        seconds = (
            start.replace(microsecond=0) + timedelta(seconds=i)
            for i in range(int((end - start).total_seconds()) + 1)
        )
        expected = [t for t in seconds if t.timestamp() % step == 0 and start <= t <= end]
        missing = [t for t in expected if covered[t] == 0]
        twice = [t for t in expected if covered[t] > 1]
        assert not missing, (
            f"{key}: ticks never dispatched: {missing[:5]}\n{cluster.logs()[-5000:]}"
        )
        assert not twice, f"{key}: ticks dispatched twice: {twice[:5]}"
    return by_id, runs


@pytest.mark.postgres
def test_the_leader_stops_while_the_database_is_down_and_catches_up_after(
    tmp_path: Path,
) -> None:
    settings = connection.settings_dict
    proxy = TcpProxy((settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432)))
    proxy.restore()
    cluster = Cluster(tmp_path, SETTINGS, env={"DATABASE_URL": database_url(port=proxy.port)})
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="each-second", task="demo.ping", interval=every, queue=queue)
    try:
        nodes = cluster.start(2)
        poll("the first dispatch", lambda: Run.objects.exists(), timeout=30)
        window_start = datetime.now(UTC) + timedelta(seconds=1)
        _wait_published_through(window_start + timedelta(seconds=2))
        proxy.cut()
        cut_at = datetime.now(UTC)
        time.sleep(6)  # past the lease TTL: nobody may lead without the database
        proxy.restore()
        restored_at = datetime.now(UTC)
        during = Run.objects.filter(
            schedule="periodic:each-second",
            created_at__gt=cut_at + timedelta(seconds=1),
            created_at__lt=restored_at,
        )
        assert not during.exists(), "nothing was recorded while the database was unreachable"

        def resumed() -> bool:
            return Run.objects.filter(tick__gt=restored_at + timedelta(seconds=3)).exists()

        try:
            poll("dispatching to resume", resumed, timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cluster.logs()[-8000:]}") from exc
        window_end = datetime.now(UTC) - timedelta(seconds=1)
        _wait_published_through(window_end)
        assert all(node.process.poll() is None for node in nodes), "runners survived the outage"
        cluster.stop()
        _, runs = _each_tick_once(
            cluster, queue, window_start, window_end, {"periodic:each-second": 1}
        )
        catch_up = [
            r for r in runs.values() if r.first_tick is not None and r.first_tick < restored_at
        ]
        assert catch_up, "the ticks missed during the outage were coalesced into one run"
    finally:
        cluster.stop()
        proxy.cut()
