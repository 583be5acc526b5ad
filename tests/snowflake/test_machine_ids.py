"""The machine-id store against the database: leases by the database clock, holders,
high-water marks."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db.models.functions import Now

from cluster_singletons.errors import (
    MachineIdsExhausted,
)
from cluster_singletons.models import MachineId
from cluster_singletons.snowflake import machine_ids
from tests.snowflake.helpers import START_MS, USING, hold_all, make_keeper


def _lease(holder: str = "me", *, now_ms: int = START_MS) -> machine_ids.Acquired | None:
    return machine_ids.acquire(
        holder=holder,
        host="test",
        pid=1,
        ttl=30.0,
        now_ms=now_ms,
        max_behind_ms=1000,
        reserve_until_ms=now_ms + 27_000,
        using=USING,
    )


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_lease_expires_by_the_database_clock_and_records_its_holder() -> None:
    machine_ids.ensure(using=USING)
    got = _lease()
    assert got == machine_ids.Acquired(machine_id=0, floor_ms=0)
    row = MachineId.objects.get(pk=0)
    assert (row.holder, row.host, row.pid, row.high_water_ms) == (
        "me",
        "test",
        1,
        START_MS + 27_000,
    )
    assert row.expires_at is not None and row.acquired_at is not None
    assert row.expires_at - row.acquired_at == pytest.approx(
        dt.timedelta(seconds=30), abs=dt.timedelta(seconds=0.01)
    )
    assert _lease("you") == machine_ids.Acquired(machine_id=1, floor_ms=0)


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_live_holders_id_is_never_taken() -> None:
    hold_all()
    assert _lease() is None
    keeper = make_keeper()
    try:
        with pytest.raises(MachineIdsExhausted, match="all 1024 are held") as caught:
            keeper.acquire(lambda grant: None)
    finally:
        keeper.release(0)
    assert caught.value.database == USING
    assert MachineId.objects.filter(holder="other").count() == 1024


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_an_expired_holders_id_is_reclaimed_after_its_high_water_mark() -> None:
    hold_all()
    MachineId.objects.filter(pk=517).update(
        expires_at=Now() - dt.timedelta(seconds=1), high_water_ms=START_MS - 5
    )
    assert _lease() == machine_ids.Acquired(machine_id=517, floor_ms=START_MS - 5)
    assert MachineId.objects.get(pk=517).holder == "me"
    assert _lease("third") is None


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_never_used_ids_go_first_and_ids_used_ahead_of_this_clock_are_skipped() -> None:
    machine_ids.ensure(using=USING)
    MachineId.objects.filter(pk=0).update(expires_at=Now() - dt.timedelta(seconds=1))
    MachineId.objects.filter(pk=1).update(high_water_ms=START_MS + 60_000)
    got = _lease()
    assert got is not None and got.machine_id == 2


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_only_the_holder_renews_or_releases_and_an_expired_lease_is_lost() -> None:
    machine_ids.ensure(using=USING)
    got = _lease()
    assert got is not None

    def renew(holder: str) -> bool:
        return machine_ids.renew(
            got.machine_id, holder=holder, ttl=30.0, reserve_until_ms=START_MS + 40_000, using=USING
        )

    assert not renew("thief")
    assert renew("me")
    assert MachineId.objects.get(pk=got.machine_id).high_water_ms == START_MS + 40_000
    assert not machine_ids.release(got.machine_id, holder="thief", last_ms=1, using=USING)
    MachineId.objects.filter(pk=got.machine_id).update(expires_at=Now() - dt.timedelta(seconds=1))
    assert not renew("me")
    assert machine_ids.release(got.machine_id, holder="me", last_ms=START_MS + 3, using=USING)
    row = MachineId.objects.get(pk=got.machine_id)
    assert (row.holder, row.high_water_ms) == (None, START_MS + 3)
