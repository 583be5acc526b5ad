"""Singletons across real ``runcluster`` processes on the test database."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_singletons.models import Runner, StateHistory, StateRecord
from project.demo.localcluster import Cluster, poll
from project.demo.models import Document

pytestmark = [pytest.mark.multiprocess, pytest.mark.django_db(transaction=True)]

FAST = {"lease_ttl": 2.0, "renew_interval": 0.5, "acquire_interval": 0.1}
BOUND = FAST["lease_ttl"] + FAST["renew_interval"] + 3.0  # failover bound, busy-host slack


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for cluster in made:
        cluster.stop()


def _cluster(clusters: list[Cluster], tmp: Path, groups: str, **settings: float) -> Cluster:
    # Its own var dir: a filesystem broker queue of its own (the database is DATABASE_URL's).
    env = {"CLUSTER_DEMO_SINGLETONS": groups, "CLUSTER_VAR_DIR": str(tmp / "var")}
    cluster = Cluster(tmp, {**FAST, **settings}, env=env)
    clusters.append(cluster)
    return cluster


def _state(key: str) -> dict[str, object] | None:
    row = StateRecord.objects.filter(key=key).first()
    return json.loads(row.value) if row else None


def test_state_survives_sigkill_of_the_leader(clusters: list[Cluster], tmp_path: Path) -> None:
    cluster = _cluster(clusters, tmp_path, "demo")
    cluster.start(2)
    old = cluster.wait_for_leader("singleton:indexer")
    progress = poll(
        "some progress", lambda: (_state("singleton:indexer") or {}).get("processed"), timeout=20
    )
    assert progress
    cluster.signal(old.pid, signal.SIGKILL)
    killed_at = _state("singleton:indexer")
    cluster.wait_for_leader("singleton:indexer", other_than=old, timeout=BOUND)
    poll(
        "the new leader to finish",
        lambda: (_state("singleton:indexer") or {}).get("processed") == 500,
        timeout=30,
    )
    last_id = Document.objects.order_by("-id").values_list("id", flat=True).first()
    assert _state("singleton:indexer") == {"cursor": last_id, "processed": 500}
    assert killed_at is not None and 0 < int(killed_at["processed"]) < 500, "killed too late"  # type: ignore[call-overload]
    assert Document.objects.filter(indexed=False).count() == 0


def test_deposed_leaders_save_is_refused(clusters: list[Cluster], tmp_path: Path) -> None:
    cluster = _cluster(clusters, tmp_path, "stubborn")
    cluster.start(2)
    old = cluster.wait_for_leader("singleton:stubborn")
    poll("saves", lambda: (_state("singleton:stubborn") or {}).get("count", 0), timeout=10)
    os.kill(old.pid, signal.SIGSTOP)
    try:
        new = cluster.wait_for_leader("singleton:stubborn", other_than=old, timeout=BOUND + 5)
        poll(
            "the new leader's saves",
            lambda: (_state("singleton:stubborn") or {}).get("epoch") == new.epoch,
            timeout=10,
        )
    finally:
        os.kill(old.pid, signal.SIGCONT)
    node = cluster.node(old.pid)
    # Usually the fence refuses the save. If the process was paused inside the save's
    # transaction, PostgreSQL ended that session instead and the save failed with it.
    poll(
        "the old leader's save to be refused",
        lambda: "fenced write refused" in node.text() or "StatePersistFailed" in node.text(),
        timeout=10,
    )
    poll(
        "the old leader to step down",
        lambda: f"runner {old.runner_id} steps down from 'singleton:stubborn'" in node.text(),
        timeout=10,
    )
    before = StateRecord.objects.get(key="singleton:stubborn")
    poll(
        "another save by the new leader",
        lambda: StateRecord.objects.get(key="singleton:stubborn").version > before.version,
        timeout=10,
    )
    row = StateRecord.objects.get(key="singleton:stubborn")
    assert row.updated_epoch == new.epoch and json.loads(row.value)["epoch"] == new.epoch
    assert not StateHistory.objects.exists()


def test_nine_singletons_spread_three_each_and_survivors_take_all_after_a_kill(
    clusters: list[Cluster], tmp_path: Path
) -> None:
    cluster = _cluster(clusters, tmp_path, "spread")
    cluster.start(3)
    poll(
        "3 singletons on each of 3 runners",
        lambda: sorted(cluster.holders("singleton:spread-").values()) == [3, 3, 3],
        timeout=60,
    )
    victim = next(iter(cluster.holders("singleton:spread-")))
    pid = Runner.objects.get(pk=victim).pid
    sent = cluster.signal(pid, signal.SIGKILL)
    poll(
        "the survivors to lead all 9",
        lambda: (
            victim not in (held := cluster.holders("singleton:spread-")) and sum(held.values()) == 9
        ),
        timeout=BOUND + 10,
    )
    took = time.monotonic() - sent
    assert took < BOUND + 2, f"{took:.2f}s\n{cluster.logs()}"
    # A survivor may briefly hold its share plus slack; it then hands the extra one off.
    poll(
        "the survivors to settle at 5 and 4",
        lambda: sorted(cluster.holders("singleton:spread-").values()) == [4, 5],
        timeout=15,
    )


def test_hooks_run_in_order_on_handoff(clusters: list[Cluster], tmp_path: Path) -> None:
    cluster = _cluster(clusters, tmp_path, "hooks", lease_ttl=30.0, renew_interval=5.0)
    cluster.start(2)
    old = cluster.wait_for_leader("singleton:hooks")
    old_node = cluster.node(old.pid)
    poll("the function to run", lambda: "HOOK run" in old_node.text(), timeout=10)
    cluster.signal(old.pid, signal.SIGTERM)
    new = cluster.wait_for_leader("singleton:hooks", other_than=old, timeout=10)
    new_node = cluster.node(new.pid)
    poll("the new leader's function", lambda: "HOOK run" in new_node.text(), timeout=10)
    assert old_node.process.wait(timeout=10) == 0
    assert _hooks(old_node.text()) == [
        f"become runner={old.runner_id} epoch={old.epoch}",
        f"run runner={old.runner_id} epoch={old.epoch}",
        f"lose runner={old.runner_id} epoch={old.epoch}",
    ]
    assert _hooks(new_node.text()) == [
        f"become runner={new.runner_id} epoch={new.epoch}",
        f"run runner={new.runner_id} epoch={new.epoch}",
    ]
    assert new.epoch == old.epoch + 1


def _hooks(log: str) -> list[str]:
    return re.findall(r"HOOK (\w+ runner=\d+ epoch=\d+)", log)


@pytest.mark.broker
def test_a_task_dispatched_by_a_singleton_sees_its_cluster_context(
    clusters: list[Cluster], tmp_path: Path
) -> None:
    cluster = _cluster(clusters, tmp_path, "demo")
    worker = cluster.start_worker()
    cluster.start(1)
    leader = cluster.wait_for_leader("singleton:rates")
    pattern = rf'ping rates total=\d+ context=(\{{"runner": {leader.runner_id}, .*\}})'
    found = poll("the task's log line", lambda: re.search(pattern, worker.text()), timeout=60)
    seen = json.loads(found.group(1))
    assert seen == {
        "runner": leader.runner_id,
        "singleton": "rates",
        "is_leader": True,
        "epoch": leader.epoch,
    }


@pytest.mark.broker
def test_a_worker_started_with_cluster_hosts_singletons_and_hands_them_off(
    clusters: list[Cluster], tmp_path: Path
) -> None:
    cluster = _cluster(clusters, tmp_path, "demo")
    worker = cluster.start_worker("--cluster")
    leader = cluster.wait_for_leader("singleton:indexer")
    assert Runner.objects.get(pk=leader.runner_id).kind == "worker"
    assert leader.pid == worker.pid
    assert cluster.leader("beat") is None, "workers do not stand for the beat"
    cluster.signal(worker.pid, signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0
    assert cluster.leader("singleton:indexer") is None, "released on warm shutdown"
    assert not Runner.objects.filter(pk=leader.runner_id).exists()


def test_a_celery_beat_with_the_leader_scheduler_hosts_the_beat_and_singletons(
    clusters: list[Cluster], tmp_path: Path
) -> None:
    cluster = _cluster(clusters, tmp_path, "demo")
    (beat,) = cluster.start(1, beat=True)
    singleton = cluster.wait_for_leader("singleton:indexer")
    assert Runner.objects.get(pk=singleton.runner_id).kind == "beat"
    assert singleton.pid == beat.pid
    assert cluster.wait_for_leader("beat").pid == beat.pid
    cluster.signal(beat.pid, signal.SIGTERM)
    assert beat.process.wait(timeout=30) == 0
    assert cluster.leader("singleton:indexer") is None, "released on shutdown"
    assert cluster.leader("beat") is None


def test_a_worker_with_an_embedded_leader_beat(clusters: list[Cluster], tmp_path: Path) -> None:
    cluster = _cluster(clusters, tmp_path, "demo")
    worker = cluster.start_worker("-B", "--scheduler", "cluster_singletons.beat:LeaderScheduler")
    leader = cluster.wait_for_leader("beat")
    assert Runner.objects.get(pk=leader.runner_id).kind == "beat"
    cluster.signal(worker.pid, signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0
    poll("the beat lease to be released", lambda: cluster.leader("beat") is None, timeout=30)
