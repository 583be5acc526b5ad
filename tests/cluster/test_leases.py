"""Lease transitions against the real database (SQLite or PostgreSQL, same code)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.db.models.functions import Now

from cluster_singletons.cluster import crash_detection, fencing, leases, membership
from cluster_singletons.models import Lease

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

USING = "default"
TTL = 30.0


def _runner() -> int:
    return membership.register(host="test", pid=1, kind="runcluster", using=USING)


def _expire(name: str) -> None:
    """Move the lease's expiry into the past, as if its TTL had run out."""
    Lease.objects.filter(name=name).update(expires_at=Now() - dt.timedelta(seconds=1))


def test_ensure_creates_a_free_lease_and_keeps_an_existing_one(lease: str) -> None:
    row = Lease.objects.get(name=lease)
    assert (row.holder_id, row.epoch, row.expires_at) == (None, 0, None)
    me = _runner()
    assert leases.acquire(lease, me, ttl=TTL, using=USING)
    leases.ensure([lease], using=USING)
    assert Lease.objects.get(name=lease).holder_id == me


def test_acquire_free_lease_starts_epoch_one_with_database_expiry(lease: str) -> None:
    me = _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term == fencing.Term(name=lease, runner_id=me, epoch=1)
    row = Lease.objects.get(name=lease)
    assert row.holder_id == me
    assert row.acquired_at is not None and row.expires_at is not None
    assert row.expires_at - row.acquired_at == pytest.approx(
        dt.timedelta(seconds=TTL), abs=dt.timedelta(seconds=0.01)
    )


def test_foreign_unexpired_lease_is_refused(lease: str) -> None:
    first, second = _runner(), _runner()
    assert leases.acquire(lease, first, ttl=TTL, using=USING)
    assert leases.acquire(lease, second, ttl=TTL, using=USING) is None
    assert Lease.objects.get(name=lease).holder_id == first


def test_renew_extends_own_lease_and_keeps_epoch(lease: str) -> None:
    me = _runner()
    term = leases.acquire(lease, me, ttl=1.0, using=USING)
    assert term is not None
    before = Lease.objects.get(name=lease).expires_at
    assert leases.renew(me, [term], ttl=TTL, using=USING) == {lease}
    row = Lease.objects.get(name=lease)
    assert row.epoch == 1 and row.expires_at is not None and before is not None
    assert row.expires_at > before


def test_renew_of_another_term_touches_nothing(lease: str) -> None:
    me, other = _runner(), _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term is not None
    stale = fencing.Term(name=lease, runner_id=me, epoch=term.epoch - 1)
    assert leases.renew(me, [stale], ttl=TTL, using=USING) == set()
    assert leases.renew(other, [term], ttl=TTL, using=USING) == set()


def test_renew_of_expired_lease_fails_even_if_nobody_took_it(lease: str) -> None:
    me = _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term is not None
    _expire(lease)
    assert leases.renew(me, [term], ttl=TTL, using=USING) == set()


def test_expired_lease_is_taken_and_epoch_increments(lease: str) -> None:
    first, second = _runner(), _runner()
    old = leases.acquire(lease, first, ttl=TTL, using=USING)
    assert old is not None
    _expire(lease)
    new = leases.acquire(lease, second, ttl=TTL, using=USING)
    assert new == fencing.Term(name=lease, runner_id=second, epoch=old.epoch + 1)
    assert leases.renew(first, [old], ttl=TTL, using=USING) == set()


def test_release_frees_at_once_and_next_acquisition_raises_epoch(lease: str) -> None:
    first, second = _runner(), _runner()
    term = leases.acquire(lease, first, ttl=TTL, using=USING)
    assert term is not None
    assert leases.release(second, using=USING) == []
    assert leases.release(first, using=USING) == [lease]
    assert Lease.objects.get(name=lease).holder_id is None
    assert leases.acquire(lease, second, ttl=TTL, using=USING) == fencing.Term(
        name=lease, runner_id=second, epoch=term.epoch + 1
    )


def test_renew_covers_several_leases_in_one_call() -> None:
    leases.ensure(["a", "b", "c"], using=USING)
    me = _runner()
    terms = [leases.acquire(n, me, ttl=TTL, using=USING) for n in ("a", "b", "c")]
    assert all(terms)
    _expire("b")
    assert leases.renew(me, [t for t in terms if t], ttl=TTL, using=USING) == {"a", "c"}


@pytest.mark.postgres
def test_postgres_takes_lease_of_a_holder_whose_session_died(lease: str) -> None:
    """Crash detection: the holder's liveness lock vanished, so its lease is taken early."""
    import psycopg

    dead, standby = _runner(), _runner()
    params = connection.get_connection_params()
    if crash_detection.probe(params) is not None:
        pytest.skip("a session lock means nothing through a pooler (CI runs this directly too)")
    session = psycopg.connect(**params, autocommit=True)
    session.execute("SELECT pg_advisory_lock(%s, %s)", [membership.LIVENESS_LOCK_NAMESPACE, dead])
    membership.set_crash_detection(dead, lock=True, how="session", using=USING)
    assert leases.acquire(lease, dead, ttl=TTL, using=USING)
    assert leases.acquire(lease, standby, ttl=TTL, using=USING, crash_detection=True) is None
    session.close()  # the holder's process is gone
    term = leases.acquire(lease, standby, ttl=TTL, using=USING, crash_detection=True)
    assert term is not None and term.epoch == 2


@pytest.mark.postgres
def test_postgres_holder_without_liveness_lock_keeps_lease_until_expiry(lease: str) -> None:
    """A holder running with crash_detection='ttl' registers no lock and is not presumed dead."""
    holder, standby = _runner(), _runner()
    assert leases.acquire(lease, holder, ttl=TTL, using=USING)
    assert leases.acquire(lease, standby, ttl=TTL, using=USING, crash_detection=True) is None


def test_release_of_a_past_term_keeps_a_newer_term_of_the_same_runner(lease: str) -> None:
    me = _runner()
    old = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert old is not None
    _expire(lease)
    new = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert new is not None and new.epoch == old.epoch + 1
    assert leases.release(me, using=USING, terms=[old]) == []
    assert leases.release(me, using=USING, terms=[new]) == [lease]


@pytest.mark.postgres
def test_a_runner_paused_inside_its_renewal_cannot_block_takeover_beyond_the_ttl() -> None:
    """The renewal's row locks are held until commit; a process paused before committing
    (SIGSTOP) must not keep standbys' acquisitions waiting on them forever."""
    import threading
    import time

    from django.db import connections, transaction

    leases.ensure(["job"], using="default")
    holder = membership.register(host="a", pid=1, kind="runcluster", using="default")
    standby = membership.register(host="b", pid=2, kind="runcluster", using="default")
    term = leases.acquire("job", holder, ttl=1, using="default")
    assert term is not None
    renewed, resume = threading.Event(), threading.Event()

    def paused_holder() -> None:
        try:
            with transaction.atomic(using="default"):
                leases.renew(holder, [term], ttl=1, using="default")
                renewed.set()
                resume.wait(10)  # the process is stopped here, inside the transaction
        except Exception:  # the server ended the idle session, as it should
            pass
        finally:
            connections.close_all()

    thread = threading.Thread(target=paused_holder)
    thread.start()
    assert renewed.wait(10)
    started = time.monotonic()
    taken = None
    while taken is None and time.monotonic() - started < 8:
        taken = leases.acquire("job", standby, ttl=1, using="default")
    waited = time.monotonic() - started
    resume.set()
    thread.join()
    assert taken is not None and taken.epoch == term.epoch + 1
    assert waited < 4, f"takeover waited {waited:.1f}s for a paused holder's locks"


def test_renew_covers_a_thousand_and_more_leases() -> None:
    """SQLite cannot parse one condition of a thousand terms; renewal must still hold them."""
    names = [f"many-{i}" for i in range(1_200)]
    leases.ensure(names, using=USING)
    me = _runner()
    terms = [leases.acquire(n, me, ttl=TTL, using=USING) for n in names]
    assert all(terms)
    _expire("many-7")
    kept = leases.renew(me, [t for t in terms if t], ttl=TTL, using=USING)
    assert kept == set(names) - {"many-7"}
