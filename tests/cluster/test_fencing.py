"""Fencing: a write commits only within its leadership term, against the real database."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection

from cluster_singletons.cluster import fencing, leases
from cluster_singletons.errors import LeadershipLost
from project.demo.models import FencedWrite
from tests.cluster.test_leases import TTL, USING, _expire, _runner

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def test_fenced_write_commits_within_the_term(lease: str) -> None:
    me = _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term is not None
    with fencing.fenced(term, using=USING, ttl=TTL):
        FencedWrite.objects.create(lease=lease, runner_id=me, epoch=term.epoch)
    assert FencedWrite.objects.filter(epoch=term.epoch).count() == 1


@pytest.mark.parametrize("how", ["expired", "taken", "released"])
def test_fenced_write_of_a_past_term_is_refused_and_writes_nothing(lease: str, how: str) -> None:
    me, other = _runner(), _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term is not None
    if how in {"expired", "taken"}:
        _expire(lease)
    if how == "taken":
        assert leases.acquire(lease, other, ttl=TTL, using=USING)
    if how == "released":
        leases.release(me, using=USING)
    with pytest.raises(LeadershipLost) as caught, fencing.fenced(term, using=USING, ttl=TTL):
        FencedWrite.objects.create(lease=lease, runner_id=me, epoch=term.epoch)
    assert caught.value.epoch == term.epoch
    assert not FencedWrite.objects.exists()


def test_failing_body_rolls_back_the_fenced_transaction(lease: str) -> None:
    me = _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term is not None
    with pytest.raises(RuntimeError), fencing.fenced(term, using=USING, ttl=TTL):
        FencedWrite.objects.create(lease=lease, runner_id=me, epoch=term.epoch)
        raise RuntimeError("boom")
    assert not FencedWrite.objects.exists()


def test_a_fenced_statement_writes_nothing_outside_its_term_and_says_so(lease: str) -> None:
    me, other = _runner(), _runner()
    term = leases.acquire(lease, me, ttl=TTL, using=USING)
    assert term is not None
    columns = ("lease", "runner_id", "epoch")
    sql = fencing.insert_sql(connection, FencedWrite, columns, fenced=True)
    with connection.cursor() as cursor:
        cursor.execute(sql, [lease, me, term.epoch, *fencing.fence_params(term)])
        assert cursor.rowcount == 1
    fencing.ensure_held(term, using=USING)
    _expire(lease)
    assert leases.acquire(lease, other, ttl=TTL, using=USING)
    with connection.cursor() as cursor:
        cursor.execute(sql, [lease, me, term.epoch + 100, *fencing.fence_params(term)])
        assert cursor.rowcount == 0
    with pytest.raises(LeadershipLost):
        fencing.ensure_held(term, using=USING)
    assert FencedWrite.objects.count() == 1


def test_the_database_clock_is_read_as_an_aware_time() -> None:
    now = fencing.database_now(USING)
    assert now.tzinfo is not None
    assert abs((now - dt.datetime.now(dt.UTC)).total_seconds()) < 60
