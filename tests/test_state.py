"""Typed durable state on the real database: CAS, fencing, schema upgrades, quarantine."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.core.management import call_command
from django.db.models.functions import Now
from pydantic import BaseModel

from cluster_singletons import leases, runners
from cluster_singletons.errors import LeadershipLost, SingletonConfigError, SingletonError
from cluster_singletons.models import Lease, StateHistory, StateRecord
from cluster_singletons.state import StateStore, state_store
from project.demo.singletons import IndexerState

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "state_v1.json"


class Counter(BaseModel):
    count: int = 0
    note: str = ""


def _term(name: str = "singleton:counter") -> leases.Term:
    leases.ensure([name], using="default")
    me = runners.register(host="t", pid=1, kind="runcluster", using="default")
    term = leases.acquire(name, me, ttl=30, using="default")
    assert term is not None
    return term


def test_absent_state_loads_the_defaults_and_writes_nothing() -> None:
    store = state_store("counter", Counter)
    assert store.load() == Counter()
    assert store.version == 0
    assert not StateRecord.objects.exists()


def test_saved_state_is_what_a_new_store_loads() -> None:
    state_store("counter", Counter).save(Counter(count=3, note="hi"))
    again = state_store("counter", Counter)
    assert again.load() == Counter(count=3, note="hi")
    assert again.version == 1


def test_save_is_compare_and_swap_on_the_version() -> None:
    first, second = state_store("counter", Counter), state_store("counter", Counter)
    first.load(), second.load()
    first.save(Counter(count=1))
    with pytest.raises(SingletonError) as caught:
        second.save(Counter(count=99))
    assert caught.value.reason == "StatePersistFailed" and caught.value.retryable
    assert state_store("counter", Counter).load().count == 1


def test_modify_applies_the_function_atomically_to_the_stored_value() -> None:
    store = state_store("counter", Counter)
    for _ in range(5):
        state_store("counter", Counter).modify(
            lambda c: c.model_copy(update={"count": c.count + 1})
        )
    assert store.load().count == 5 and store.version == 5


def test_fenced_save_by_the_leader_records_its_epoch() -> None:
    term = _term()
    StateStore("singleton:counter", Counter, term=term).save(Counter(count=1))
    assert StateRecord.objects.get().updated_epoch == term.epoch


def test_deposed_leaders_save_is_refused_and_the_row_is_unchanged() -> None:
    term = _term()
    store = StateStore("singleton:counter", Counter, term=term)
    store.save(Counter(count=1))
    Lease.objects.filter(name=term.name).update(expires_at=Now() - dt.timedelta(seconds=1))
    with pytest.raises(LeadershipLost):
        store.save(Counter(count=2))
    with pytest.raises(LeadershipLost):
        store.modify(lambda c: Counter(count=3))
    row = StateRecord.objects.get()
    assert (row.value, row.version) == ('{"count":1,"note":""}', 1)


def test_key_prefix_namespaces_keys(settings: Any) -> None:
    settings.CLUSTER_SINGLETONS = {"key_prefix": "shop:"}
    state_store("counter", Counter).save(Counter(count=1))
    assert list(StateRecord.objects.values_list("key", flat=True)) == ["shop:counter"]


def test_v1_fixture_rows_upgrade_to_v2_and_keep_the_old_value_in_history() -> None:
    call_command("loaddata", str(FIXTURES), verbosity=0)
    store = StateStore("singleton:indexer", IndexerState)
    assert store.load() == IndexerState(cursor=120, processed=120)
    row = StateRecord.objects.get(key="singleton:indexer")
    assert (row.schema_version, row.version) == (2, 8)
    assert row.value == '{"cursor":120,"processed":120}'
    old = StateHistory.objects.get(key="singleton:indexer")
    assert (old.reason, old.value, old.schema_version) == ("upgrade", '{"last_id": 120}', 1)
    assert state_store("reports:indexer-copy", IndexerState).load().cursor == 5


def test_corrupt_row_is_quarantined_never_overwritten_and_reported() -> None:
    call_command("loaddata", str(FIXTURES), verbosity=0)
    before = StateRecord.objects.get(key="singleton:corrupt").value
    store = StateStore("singleton:corrupt", IndexerState, owner="corrupt")
    for _ in range(2):
        with pytest.raises(SingletonError) as caught:
            store.load()
        assert caught.value.reason == "SchemaDecodeFailed" and not caught.value.retryable
        assert caught.value.singleton == "corrupt"
    with pytest.raises(SingletonError):
        store.modify(lambda s: IndexerState())
    with pytest.raises(SingletonError):
        store.save(IndexerState(cursor=1))
    row = StateRecord.objects.get(key="singleton:corrupt")
    assert row.value == before and row.status == "quarantined" and "JSON" in row.problem
    assert StateHistory.objects.filter(key="singleton:corrupt", reason="quarantine").count() == 1


def test_reset_keeps_the_old_value_in_history_and_lifts_a_quarantine() -> None:
    call_command("loaddata", str(FIXTURES), verbosity=0)
    store = StateStore("singleton:corrupt", IndexerState)
    with pytest.raises(SingletonError):
        store.load()
    store.reset(note="operator reset")
    assert store.load() == IndexerState()
    kept = StateHistory.objects.get(key="singleton:corrupt", reason="reset")
    assert kept.note == "operator reset" and kept.value.startswith('{"cursor": "forty-two"')


class Future(BaseModel):
    schema_version: ClassVar[int] = 1
    count: int = 0


def test_a_version_newer_than_the_code_is_refused_not_truncated() -> None:
    StateRecord.objects.create(key="future", value='{"count": 1, "more": 2}', schema_version=3)
    with pytest.raises(SingletonError, match="newer than Future's 1"):
        state_store("future", Future).load()
    assert StateRecord.objects.get(key="future").value == '{"count": 1, "more": 2}'


def test_a_failing_upgrade_quarantines_the_row() -> None:
    class Broken(BaseModel):
        schema_version: ClassVar[int] = 2
        upgrades: ClassVar[dict[int, Any]] = {1: lambda data: data["missing"]}

    StateRecord.objects.create(key="broken", value="{}", schema_version=1)
    with pytest.raises(SingletonError, match="upgrade from version 1 failed"):
        state_store("broken", Broken).load()
    assert StateRecord.objects.get(key="broken").status == "quarantined"


class Gap(BaseModel):
    schema_version: ClassVar[int] = 3
    upgrades: ClassVar[dict[int, Any]] = {1: lambda data: data}


@pytest.mark.parametrize(
    ("model", "message"), [(dict, "pydantic BaseModel"), (Gap, "no upgrade from version 2")]
)
def test_bad_state_models_are_refused_with_the_owner_named(model: Any, message: str) -> None:
    with pytest.raises(SingletonConfigError, match=message) as caught:
        StateStore("x", model, owner="reports")
    assert "'reports'" in str(caught.value)
