"""Typed durable state on the real database: CAS, fencing, schema upgrades, quarantine."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from pydantic import BaseModel

from cluster_singletons.cluster import fencing, leases, membership
from cluster_singletons.errors import LeadershipLost, SingletonConfigError, SingletonError
from cluster_singletons.models import Lease, StateHistory, StateRecord
from cluster_singletons.singletons.state import StateStore, state_store
from project.demo.localcluster import poll
from project.demo.singletons import IndexerState

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "state_v1.json"


class Counter(BaseModel):
    count: int = 0
    note: str = ""


def _term(name: str = "singleton:counter") -> fencing.Term:
    leases.ensure([name], using="default")
    me = membership.register(host="t", pid=1, kind="runcluster", using="default")
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


def _end(term: fencing.Term, how: str) -> None:
    """End ``term`` the way ``how`` says: the lease expired, was taken, or was released."""
    if how in {"expired", "taken"}:
        Lease.objects.filter(name=term.name).update(expires_at=Now() - dt.timedelta(seconds=1))
    if how == "taken":
        other = membership.register(host="t", pid=2, kind="runcluster", using="default")
        assert leases.acquire(term.name, other, ttl=30, using="default")
    if how == "released":
        assert leases.release(term.runner_id, using="default") == [term.name]


@pytest.mark.parametrize("how", ["expired", "taken", "released"])
def test_a_past_terms_first_save_inserts_nothing(how: str) -> None:
    term = _term()
    store = StateStore("singleton:counter", Counter, term=term)
    assert store.load() == Counter()
    _end(term, how)
    with pytest.raises(LeadershipLost) as caught:
        store.save(Counter(count=1))
    assert caught.value.epoch == term.epoch
    assert not StateRecord.objects.exists()


@pytest.mark.parametrize("how", ["taken", "released"])
def test_a_past_terms_save_is_refused_however_the_term_ended(how: str) -> None:
    term = _term()
    store = StateStore("singleton:counter", Counter, term=term)
    store.save(Counter(count=1))
    _end(term, how)
    with pytest.raises(LeadershipLost):
        store.save(Counter(count=2))
    row = StateRecord.objects.get()
    assert (row.version, row.updated_epoch) == (1, term.epoch)


def test_a_leaders_save_based_on_a_stale_version_is_a_conflict_not_a_lost_term() -> None:
    term = _term()
    first = StateStore("singleton:counter", Counter, term=term)
    second = StateStore("singleton:counter", Counter, term=term)
    first.load(), second.load()
    first.save(Counter(count=1))
    with pytest.raises(SingletonError) as caught:  # a conflicting insert
        second.save(Counter(count=2))
    assert caught.value.reason == "StatePersistFailed"
    second.load()
    first.save(Counter(count=3))
    with pytest.raises(SingletonError) as caught:  # a conflicting update
        second.save(Counter(count=4))
    assert caught.value.reason == "StatePersistFailed"
    assert StateStore("singleton:counter", Counter).load().count == 3


def test_a_lost_term_is_reported_before_a_version_conflict() -> None:
    term = _term()
    stale = StateStore("singleton:counter", Counter, term=term)
    stale.load()
    StateStore("singleton:counter", Counter, term=term).save(Counter(count=1))
    _end(term, "taken")
    with pytest.raises(LeadershipLost):
        stale.save(Counter(count=2))


def test_a_fenced_save_is_one_statement() -> None:
    store = StateStore("singleton:counter", Counter, term=_term())
    store.load()
    for count in (1, 2):  # the insert, then an update
        with CaptureQueriesContext(connection) as captured:
            store.save(Counter(count=count))
        assert len(captured) == 1, captured.captured_queries
    assert StateRecord.objects.get().version == 2


def test_a_fenced_save_inside_a_transaction_commits_and_rolls_back_with_it() -> None:
    term = _term()
    store = StateStore("singleton:counter", Counter, term=term)
    store.save(Counter(count=1))
    with pytest.raises(RuntimeError), transaction.atomic():
        store.save(Counter(count=2))
        raise RuntimeError("boom")
    assert StateRecord.objects.get().version == 1
    store.version = 1
    with transaction.atomic():
        store.save(Counter(count=3))
    assert StateRecord.objects.get().value == '{"count":3,"note":""}'
    _end(term, "expired")
    with transaction.atomic():
        with pytest.raises(LeadershipLost):
            store.save(Counter(count=4))
        assert StateRecord.objects.get().version == 2, "the outer transaction is still usable"


@pytest.mark.postgres
def test_postgres_a_fenced_save_locks_the_lease_row_before_the_state_row() -> None:
    """So no acquisition can commit between the save's check and its commit."""
    import psycopg

    term = _term()
    store = StateStore("singleton:counter", Counter, term=term)
    store.save(Counter(count=1))
    params = connection.get_connection_params()
    lease, state = Lease._meta.db_table, StateRecord._meta.db_table
    errors: list[BaseException] = []

    def save() -> None:
        try:
            store.save(Counter(count=2))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    with psycopg.connect(**params) as holder, psycopg.connect(**params, autocommit=True) as other:
        holder.execute(f'SELECT 1 FROM "{state}" WHERE key = %s FOR UPDATE', [store.key])
        saving = threading.Thread(target=save)
        saving.start()
        poll(
            "the save to wait for the state row",
            lambda: other.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ).fetchone(),
            timeout=10,
        )
        other.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute(f'UPDATE "{lease}" SET epoch = epoch + 1 WHERE name = %s', [term.name])
        holder.rollback()
        saving.join(10)
    assert not errors and StateRecord.objects.get().version == 2


@pytest.mark.postgres
def test_postgres_fenced_save_inside_a_transaction_bounds_its_idle_time() -> None:
    store = StateStore("singleton:counter", Counter, term=_term())
    with transaction.atomic(), connection.cursor() as cursor:
        store.save(Counter(count=1))
        cursor.execute("SELECT current_setting('idle_in_transaction_session_timeout')")
        assert cursor.fetchone() != ("0",)


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
    store.version = StateRecord.objects.get(key="singleton:corrupt").version
    with pytest.raises(SingletonError) as caught:  # at the row's version, yet refused
        store.save(IndexerState(cursor=1))
    assert caught.value.reason == "StatePersistFailed"
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
