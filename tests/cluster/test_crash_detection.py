"""Crash detection by session is used only on a proven direct session (PostgreSQL)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections
from django.test import override_settings

from cluster_singletons.checks import check_crash_detection
from cluster_singletons.cluster.crash_detection import (
    Liveness,
    NotDirect,
    Watch,
    indirect_reason,
    probe,
)
from cluster_singletons.cluster.membership import LIVENESS_LOCK_NAMESPACE
from project.demo.localcluster import poll
from project.demo.pgbouncer import PgBouncer
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

RUNNER = 987_654


def _params(port: int | None = None) -> dict[str, Any]:
    params = connection.get_connection_params()
    if port is not None:
        params = {**params, "host": "127.0.0.1", "port": port}
    return params


def _lock_holders(runner: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s::oid AND objid = %s::oid AND objsubid = 2",
            [LIVENESS_LOCK_NAMESPACE, runner],
        )
        return [pid for (pid,) in cursor.fetchall()]


def test_a_direct_session_is_proven_and_holds_the_lock() -> None:
    assert probe(_params()) is None
    session = Liveness(params=_params(), runner_id=RUNNER, on_release=lambda: None)
    session.start()
    try:
        assert len(_lock_holders(RUNNER)) == 1
        assert not session.lost.is_set()
    finally:
        session.close()
    poll("the lock to go with the session", lambda: not _lock_holders(RUNNER), timeout=5)


def test_a_session_through_pgbouncer_fails_the_proof_and_takes_no_lock(
    pgbouncer: PgBouncer,
) -> None:
    reason = probe(_params(pgbouncer.port))
    assert reason is not None and "pooler or proxy" in reason
    session = Liveness(params=_params(pgbouncer.port), runner_id=RUNNER, on_release=lambda: None)
    with pytest.raises(NotDirect, match="pooler or proxy"):
        session.start()
    assert _lock_holders(RUNNER) == [], "no lock is left on a pooled server connection"


def test_a_session_whose_lock_vanishes_is_lost_at_the_next_check() -> None:
    released = threading.Event()
    session = Liveness(
        params=_params(), runner_id=RUNNER, on_release=released.set, check_every=0.05
    )
    session.start()
    try:
        conn = session._conn
        assert conn is not None and indirect_reason(conn) is None
        # What a pooler recycling the server connection under a runner amounts to: the
        # session lives on, the lock does not.
        conn.execute("SELECT pg_advisory_unlock_all()")
        poll("the session to be declared lost", session.lost.is_set, timeout=5)
        assert released.is_set(), "standbys are woken to act on it"
    finally:
        session.close()


@contextlib.contextmanager
def _alias(name: str, port: int) -> Iterator[None]:
    """A DATABASES alias for the test database through ``port``, for the duration."""
    connections.settings[name] = {**connection.settings_dict, "HOST": "127.0.0.1", "PORT": port}
    try:
        yield
    finally:
        connections[name].close()
        del connections.settings[name]


def test_the_system_check_warns_when_the_cluster_database_is_pooled(
    pgbouncer: PgBouncer,
) -> None:
    assert check_crash_detection(databases=["default"]) == []
    with _alias("pooled", pgbouncer.port):
        with override_settings(CLUSTER_SINGLETONS={"database": "pooled"}):
            found = check_crash_detection(databases=["pooled"])
            assert check_crash_detection(databases=None) == [], "only when asked to"
        assert [m.id for m in found] == ["cluster_singletons.W004"]
        assert "pooler or proxy" in found[0].msg and "'ttl'" in (found[0].hint or "")
        with override_settings(CLUSTER_SINGLETONS={"database": "pooled", "crash_detection": "ttl"}):
            assert check_crash_detection(databases=["pooled"]) == [], "'ttl' says so already"


def _waiting_for(runner: int) -> int:
    """Sessions waiting for a shared hold of ``runner``'s lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND mode = 'ShareLock' AND classid = %s::oid AND objid = %s::oid",
            [LIVENESS_LOCK_NAMESPACE, runner],
        )
        (count,) = cursor.fetchone()
        return int(count)


def test_a_watch_learns_of_a_dead_holder_when_the_server_does() -> None:
    holder = Liveness(params=_params(), runner_id=RUNNER, on_release=lambda: None)
    holder.start()
    gone = threading.Event()
    watch = Watch(params=_params(), on_gone=gone.set, wait=0.2, rewatch_after=0.5)
    try:
        watch.follow({RUNNER})
        poll("the watch to wait on the holder's lock", lambda: _waiting_for(RUNNER), timeout=5)
        assert not gone.is_set()
        assert len(_lock_holders(RUNNER)) == 1, "a waiting watch is not a holder"
        assert holder._conn is not None
        ended = time.monotonic()
        # What the server does when the holder's process dies: its session ends.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [holder._conn.info.backend_pid])
        poll("the watch to hear of it", gone.is_set, timeout=5, every=0.001)
        assert time.monotonic() - ended < 0.5
        poll("the watch to let go", lambda: not _lock_holders(RUNNER), timeout=5)
        watch.follow({RUNNER})
        assert watch.following == set(), "a holder just seen gone is not watched again"
        # It only lost its session: it proves a new one and holds its lock again; once
        # rewatch_after has passed, it is watched again, and its death heard again.
        holder.close()
        holder = Liveness(params=_params(), runner_id=RUNNER, on_release=lambda: None)
        holder.start()
        gone.clear()
        poll(
            "the holder to be watched again",
            lambda: watch.follow({RUNNER}) or (watch.following == {RUNNER}),
            timeout=5,
        )
        poll("the watch to wait on the holder's lock", lambda: _waiting_for(RUNNER), timeout=5)
        assert holder._conn is not None
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [holder._conn.info.backend_pid])
        poll("the watch to hear of it again", gone.is_set, timeout=5, every=0.001)
    finally:
        watch.close()
        holder.close()


def test_a_session_through_a_one_to_one_tcp_proxy_keeps_the_proof() -> None:
    """A 1:1 forwarder (HAProxy in TCP mode, NAT) is still one server session."""
    db = connection.settings_dict
    proxy = TcpProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    proxy.restore()
    try:
        assert probe(_params(proxy.port)) is None
    finally:
        proxy.cut()
