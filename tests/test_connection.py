"""A thread's database connection after the database or a pooler restarted: every loop that
touches the database drops a connection closed under it and connects again on its own."""

from __future__ import annotations

import functools
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.db import DatabaseError, OperationalError, connection, connections
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.models import Heartbeat, Lease, Run
from project.demo.localcluster import Cluster, database_url, poll
from project.demo.probes import COUNTING
from tests.beat.test_processes import _each_tick_once, _wait_published_through
from tests.tcpproxy import TcpProxy, end_session

#: How long the database is cut off: what a pooler or database restart takes, as measured
#: in the issue; longer than the backoff cap, so every loop fails several times meanwhile.
CUT = 15.0
RETRY_MAX = 2.0
RESTARTS = {
    # Longer than the cut: the leaders keep their terms across it, so no thread is replaced
    # by a new term's; each has to replace its connection itself.
    "lease_ttl": CUT + 5.0,
    "renew_interval": 1.0,
    "acquire_interval": 0.1,
    "retry_backoff": 0.25,
    "retry_backoff_max": RETRY_MAX,
    # Behind a proxy the liveness session ends with the cut and every term with it (the
    # beat's outage test covers that path); here expiry decides, as behind a pooler.
    "crash_detection": "ttl",
    "beat_refresh_interval": 1.0,
}
COUNTERS = [f"singleton:counting-{i}" for i in range(COUNTING)]
#: What a loop retrying on a connection the database closed logs, whichever driver.
DATABASE_ERROR = re.compile(
    r"OperationalError|InterfaceError|connection is closed|connection already closed"
    r"|HeartbeatFailed|server closed the connection|Connection refused"
)


@pytest.mark.db
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("using", ["default", None], ids=["its-alias", "every-alias"])
def test_a_connection_the_server_ended_is_replaced_at_the_next_statement(
    using: str | None,
) -> None:
    end_session()
    with pytest.raises(OperationalError, match="connection is closed"):
        Lease.objects.count()  # Django alone would fail like this forever
    drop_if_unusable(using)
    assert Lease.objects.count() == 0


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_connection_that_still_answers_after_an_error_is_kept() -> None:
    conn = connections["default"]
    saved = conn.settings_dict["CONN_MAX_AGE"]
    conn.settings_dict["CONN_MAX_AGE"] = None  # persistent: only a broken one may go
    try:
        conn.close()
        conn.ensure_connection()
        raw = conn.connection
        with pytest.raises(DatabaseError), conn.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_for_connection_tests")
        drop_if_unusable("default")
        assert conn.connection is raw
    finally:
        conn.settings_dict["CONN_MAX_AGE"] = saved
        conn.close()


@pytest.mark.db
@pytest.mark.django_db
def test_inside_a_transaction_the_connection_is_left_to_its_owner() -> None:
    conn = connections["default"]
    assert conn.in_atomic_block  # the test's own transaction
    raw = conn.connection
    drop_if_unusable("default")  # outside one, CONN_MAX_AGE=0 would close it
    assert conn.connection is raw
    assert not conn.needs_rollback


def _beat_since(name: str, moment: datetime) -> bool:
    return Heartbeat.objects.filter(name=name, beat_at__gt=moment).exists()


def _published_since(moment: datetime) -> bool:
    return Run.objects.filter(
        schedule="periodic:each-second", tick__gt=moment, published_at__isnull=False
    ).exists()


@pytest.mark.multiprocess
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_every_loop_reconnects_after_the_database_comes_back(tmp_path: Path) -> None:
    settings = connection.settings_dict
    port = int(settings["PORT"] or 5432)
    proxy = TcpProxy((settings["HOST"] or "127.0.0.1", port))
    proxy.restore()
    env = {
        "DATABASE_URL": database_url().replace(f":{port}/", f":{proxy.port}/"),
        "CLUSTER_DEMO_SINGLETONS": "counting",
    }
    cluster = Cluster(tmp_path, RESTARTS, env=env)
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="each-second", task="demo.ping", interval=every, queue=queue)
    try:
        nodes = cluster.start(2)
        poll(
            "the singletons spread over both runners",
            lambda: sorted(cluster.holders("singleton:").values()) == [1] * COUNTING,
            timeout=30,
        )
        window_start = datetime.now(UTC) + timedelta(seconds=1)
        _wait_published_through(window_start + timedelta(seconds=1))
        poll(
            "both singletons' heartbeats",
            lambda: all(_beat_since(name, window_start) for name in COUNTERS),
            timeout=10,
        )
        epochs = dict(Lease.objects.values_list("name", "epoch"))

        proxy.cut()
        time.sleep(CUT)  # the outage itself, not a wait for a schedule
        proxy.restore()
        restored, restored_at = time.monotonic(), datetime.now(UTC)
        resumed = _resumed(cluster, restored, restored_at)
        print(f"resumed after the restore (s): {resumed}")
        assert dict(Lease.objects.values_list("name", "epoch")) == epochs, (
            "the leaders kept their terms across the cut (else new threads did the work)"
        )
        failed = "".join(node.text() for node in nodes)
        assert all(f"StateLoadFailed in singleton {n[10:]!r}" in failed for n in COUNTERS), (
            "both singletons met the cut"
        )

        # From here on nothing fails again: watch the logs for longer than any loop's
        # backoff while the singletons count on and ticks go out.
        marks = {node.pid: len(node.text()) for node in nodes}
        recovered = datetime.now(UTC)
        window_end = recovered + timedelta(seconds=2 * RETRY_MAX)
        poll(
            "the singletons to count on",
            lambda: all(_beat_since(name, window_end) for name in COUNTERS),
            timeout=4 * RETRY_MAX,
        )
        _wait_published_through(window_end)
        repeated = [
            f"pid {node.pid}: {line}"
            for node in nodes
            for line in node.text()[marks[node.pid] :].splitlines()
            if DATABASE_ERROR.search(line)
        ]
        assert repeated == [], "\n".join(repeated[:10])
        assert all(node.process.poll() is None for node in nodes), "the runners survived"
        cluster.stop()

        # Every tick went out once; those missed during the cut in one run, coalesced.
        _, runs = _each_tick_once(
            cluster, queue, window_start, window_end, {"periodic:each-second": 1}
        )
        assert any(
            r.first_tick is not None and r.first_tick < restored_at and r.ticks > 1
            for r in runs.values()
        ), "the ticks missed during the cut were coalesced into one run"
    finally:
        cluster.stop()
        proxy.cut()


def _resumed(cluster: Cluster, restored: float, restored_at: datetime) -> dict[str, float]:
    """Seconds after the restore at which each loop showed it works again; fails unless
    all did within twice the backoff cap."""
    probes = {
        **{name: functools.partial(_beat_since, name, restored_at) for name in COUNTERS},
        "beat": functools.partial(_beat_since, "beat", restored_at),
        "a tick published": functools.partial(_published_since, restored_at),
    }
    resumed: dict[str, float] = {}

    def everything() -> bool:
        for what, probe in probes.items():
            if what not in resumed and probe():
                resumed[what] = round(time.monotonic() - restored, 2)
        return len(resumed) == len(probes)

    try:
        poll("every loop to work again", everything, timeout=2 * RETRY_MAX)
    except AssertionError as exc:
        late = sorted(set(probes) - set(resumed))
        raise AssertionError(f"{exc}: {late} did not\n{cluster.logs()[-6000:]}") from exc
    return resumed
