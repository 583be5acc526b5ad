"""Failover with real ``runcluster`` processes on the test database (SQLite or PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from cluster_singletons.models import Lease, Runner
from project.demo.localcluster import ROOT, Cluster, database_url, poll
from project.demo.models import FencedWrite
from project.demo.pgbouncer import PgBouncer

pytestmark = [pytest.mark.multiprocess, pytest.mark.django_db(transaction=True)]

FAST = {"lease_ttl": 2.0, "renew_interval": 0.5, "acquire_interval": 0.1}
#: A TTL far longer than any takeover we accept, to prove a takeover did not wait for expiry.
LONG = {"lease_ttl": 30.0, "renew_interval": 5.0, "acquire_interval": 0.1}


def test_sigkill_of_the_leader_hands_the_lease_to_a_standby(cluster_factory: type[Cluster]) -> None:
    cluster = cluster_factory(FAST)
    cluster.start(3)
    old = cluster.wait_for_leader()
    sent = cluster.signal(old.pid, signal.SIGKILL)
    new = cluster.wait_for_leader(other_than=old, timeout=30)
    took = time.monotonic() - sent
    survivors = {node.pid for node in cluster.nodes if node.pid != old.pid}
    assert new.pid in survivors
    assert new.epoch == old.epoch + 1
    # Bounded by expiry (SQLite) or by crash detection (PostgreSQL); generous for a busy host.
    assert took < FAST["lease_ttl"] + FAST["renew_interval"] + 3.0, cluster.logs()


@pytest.mark.postgres
def test_postgres_sees_a_killed_leader_long_before_its_lease_expires(
    cluster_factory: type[Cluster],
) -> None:
    cluster = cluster_factory(LONG)
    cluster.start(2)
    old = cluster.wait_for_leader()
    sent = cluster.signal(old.pid, signal.SIGKILL)
    cluster.wait_for_leader(other_than=old, timeout=LONG["lease_ttl"])
    assert time.monotonic() - sent < 5.0, cluster.logs()


def test_sigterm_releases_at_once_exits_zero_and_deregisters(
    cluster_factory: type[Cluster],
) -> None:
    cluster = cluster_factory(LONG)
    cluster.start(3)
    old = cluster.wait_for_leader()
    sent = cluster.signal(old.pid, signal.SIGTERM)
    new = cluster.wait_for_leader(other_than=old, timeout=LONG["lease_ttl"])
    took = time.monotonic() - sent
    node = cluster.node(old.pid)
    assert node.process.wait(timeout=15) == 0
    assert took < 5.0, cluster.logs()
    assert new.epoch == old.epoch + 1
    assert not Runner.objects.filter(pk=old.runner_id).exists()
    assert f"runner {old.runner_id} released 'beat' (epoch {old.epoch})" in node.text()


def test_sigstopped_leader_is_fenced_out_and_steps_down_after_sigcont(
    cluster_factory: type[Cluster],
) -> None:
    cluster = cluster_factory(FAST, lead=["probe=project.demo.work:stubborn_probe"])
    cluster.start(3)
    old = cluster.wait_for_leader("probe")
    poll("fenced writes", lambda: FencedWrite.objects.filter(epoch=old.epoch).exists(), timeout=10)
    new = _stop_until_replaced(cluster, old)
    poll(
        "writes of the new term",
        lambda: FencedWrite.objects.filter(epoch=new.epoch).count() >= 3,
        timeout=10,
    )
    os.kill(old.pid, signal.SIGCONT)
    node = cluster.node(old.pid)
    poll(
        "the old leader to step down",
        lambda: f"runner {old.runner_id} steps down from 'probe'" in node.text(),
        timeout=15,
    )
    # Usually the resumed probe's next write is refused by the fence. If it was paused inside
    # a fenced transaction on PostgreSQL, the server ended that session instead, and the
    # write fails with the lost connection (the message may only say it was closed).
    poll(
        "the old leader's write to be refused",
        lambda: any(
            sign in node.text()
            for sign in (
                "fenced write refused",
                "idle-in-transaction",
                "leader work for 'probe' failed",
            )
        ),
        timeout=10,
    )
    assert node.process.poll() is None
    assert cluster.leader("probe") != old
    epochs = list(
        FencedWrite.objects.filter(lease="probe").order_by("id").values_list("epoch", flat=True)
    )
    assert epochs == sorted(epochs), "a write of an old term committed after a newer term's write"
    first_new = FencedWrite.objects.filter(epoch=new.epoch).order_by("id").first()
    assert first_new is not None
    assert not FencedWrite.objects.filter(epoch=old.epoch, id__gt=first_new.id).exists()


def _stop_until_replaced(cluster: Cluster, old: object) -> object:
    """SIGSTOP the leader until a standby takes over.

    On SQLite a process stopped inside a write transaction keeps the file's write lock, which
    stalls every other process until it resumes (a limitation README documents); when that
    happens, resume it and stop it again.
    """
    from project.demo.localcluster import Leader

    assert isinstance(old, Leader)
    for _ in range(5):
        os.kill(old.pid, signal.SIGSTOP)
        try:
            return cluster.wait_for_leader("probe", other_than=old, timeout=FAST["lease_ttl"] + 6)
        except AssertionError:
            if connection.vendor != "sqlite":
                raise
            os.kill(old.pid, signal.SIGCONT)
            time.sleep(0.2)  # let it leave the transaction; not waiting for a schedule
    raise AssertionError("no standby took over from the stopped leader")


@pytest.mark.django_db(transaction=False)
def test_unreachable_database_at_start_retries_then_exits_1_without_tracebacks(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/unreachable",
        "CLUSTER_SINGLETONS_JSON": '{"startup_timeout": 2, "retry_backoff": 0.2}',
        "CLUSTER_VAR_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "runcluster"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert output.count("database unreachable") >= 3, output
    assert "giving up" in output and "startup_timeout" in output
    assert "Traceback" not in output


def test_lease_rows_exist_for_what_runners_stand_for(cluster_factory: type[Cluster]) -> None:
    cluster = cluster_factory(FAST, lead=["probe=project.demo.work:fenced_probe"])
    cluster.start(1)
    poll("both leases led", lambda: cluster.leader("beat") and cluster.leader("probe"), timeout=10)
    assert set(Lease.objects.values_list("name", flat=True)) == {
        "beat",
        "probe",
        "singleton:indexer",
        "singleton:rates",
    }


@pytest.mark.postgres
def test_postgres_leader_that_loses_its_session_steps_down_and_a_standby_takes_over(
    cluster_factory: type[Cluster],
) -> None:
    """The database drops the leader's liveness session: it stops leading at once and frees
    its lease rows, so nobody waits for their expiry."""
    from cluster_singletons.cluster.membership import LIVENESS_LOCK_NAMESPACE

    cluster = cluster_factory(LONG)
    cluster.start(2)
    old = cluster.wait_for_leader()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND classid = %s::oid AND objid = %s::oid AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [LIVENESS_LOCK_NAMESPACE, old.runner_id],
        )
        assert cursor.fetchall() == [(True,)]
    # A new term starts at once: by a standby, or by the old leader once its session is back.
    poll("a new term", lambda: (cluster.leader() or old).epoch > old.epoch, timeout=10)
    node = cluster.node(old.pid)
    poll(
        "the old leader to step down and restore its session",
        lambda: (
            "liveness session lost" in node.text()
            and f"runner {old.runner_id}: liveness session restored" in node.text()
        ),
        timeout=15,
    )
    assert node.process.poll() is None


@pytest.mark.postgres
def test_behind_pgbouncer_with_default_settings_no_live_leader_is_deposed(
    cluster_factory: type[Cluster], pgbouncer: PgBouncer
) -> None:
    """PgBouncer in transaction mode recycles the server connection a session lock lives
    on; "auto" must notice it cannot prove a direct session and fall back to expiry, so no
    leadership changes while every runner lives."""
    quiet = float(os.environ.get("CLUSTER_POOLER_QUIET_SECONDS", "60"))
    cluster = cluster_factory({}, env={"DATABASE_URL": database_url(port=pgbouncer.port)})
    cluster.start(3)
    cluster.wait_for_leader()
    poll(
        "every lease to be led", lambda: not Lease.objects.filter(holder=None).exists(), timeout=30
    )
    # Placement hands singletons to the runners that joined after the first took them all.
    poll(
        "the singletons to spread",
        lambda: (
            max(cluster.holders("singleton:").values(), default=2) <= 1
            and sum(cluster.holders("singleton:").values()) == 2
        ),
        timeout=60,
    )
    before = dict(Lease.objects.values_list("name", "epoch"))
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        now = dict(Lease.objects.values_list("name", "epoch"))
        assert now == before, f"leadership changed without a fault\n{cluster.logs()[-6000:]}"
        time.sleep(0.2)
    for runner in Runner.objects.filter(pid__in=[node.pid for node in cluster.nodes]):
        assert runner.crash_detection.startswith("expiry: the connection goes through a pooler")
        assert not runner.liveness_lock
    for node in cluster.nodes:
        assert node.text().count("crash detection falls back to lease expiry") == 1
        assert "Traceback" not in node.text(), node.text()
