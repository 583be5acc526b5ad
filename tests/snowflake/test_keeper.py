"""The generator with the keeper against the database: leasing on the first id,
replacing a lost id, fork safety, never in the caller's transaction."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from django.db import connection, transaction

from cluster_singletons.errors import (
    MachineIdsExhausted,
    MachineIdUnavailable,
)
from cluster_singletons.models import MachineId
from cluster_singletons.snowflake.generator import (
    GeneratorConfig,
    SnowflakeGenerator,
)
from cluster_singletons.snowflake.keeper import MachineIdKeeper
from cluster_singletons.snowflake.value import Snowflake
from tests.snowflake.helpers import EPOCH_MS, hold_all, increasing, make_keeper
from tests.tcpproxy import end_session


@pytest.fixture
def made() -> Iterator[list[SnowflakeGenerator]]:
    generators: list[SnowflakeGenerator] = []
    yield generators
    for gen in generators:
        gen.close()


def _db_generator(made: list[SnowflakeGenerator]) -> tuple[SnowflakeGenerator, MachineIdKeeper]:
    keeper = make_keeper()
    config = GeneratorConfig(epoch_ms=EPOCH_MS, max_clock_rollback=1.0, machine_ids=keeper)
    gen = SnowflakeGenerator(config)
    made.append(gen)
    return gen, keeper


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_generator_leases_on_its_first_id_and_releases_on_close(
    made: list[SnowflakeGenerator],
) -> None:
    gen, keeper = _db_generator(made)
    assert not MachineId.objects.exists()  # building it did no I/O
    ids = [gen.next_id() for _ in range(1_000)] + gen.generate_ids(10_000)
    assert increasing(ids)
    grant = keeper.grant
    assert grant is not None and gen.machine_id == grant.machine_id
    assert {Snowflake(i).machine_id for i in ids} == {grant.machine_id}
    row = MachineId.objects.get(pk=grant.machine_id)
    assert (row.holder, row.pid) == (grant.token, os.getpid())
    assert row.high_water_ms is not None and row.high_water_ms >= Snowflake(ids[-1]).timestamp
    assert keeper.renew()
    gen.close()
    row.refresh_from_db()
    assert row.holder is None
    assert row.high_water_ms == Snowflake(ids[-1]).timestamp + EPOCH_MS


@pytest.mark.db
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_keeper_renews_after_the_server_ended_its_session(
    made: list[SnowflakeGenerator],
) -> None:
    gen, keeper = _db_generator(made)
    gen.next_id()
    keeper._call(end_session)  # the database restarts under the keeper's thread
    assert keeper.renew(), "renewed on a new connection"


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_lost_machine_id_is_replaced_before_the_next_id(
    made: list[SnowflakeGenerator],
) -> None:
    gen, keeper = _db_generator(made)
    before = Snowflake(gen.next_id())
    MachineId.objects.filter(pk=before.machine_id).update(holder="thief")
    assert not keeper.renew()
    assert gen.machine_id is None
    after = Snowflake(gen.next_id())
    assert after.machine_id != before.machine_id and after > before
    assert MachineId.objects.get(pk=after.machine_id).holder == (
        keeper.grant and keeper.grant.token
    )


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_all_machine_ids_held_gives_a_clear_error(made: list[SnowflakeGenerator]) -> None:
    hold_all()
    gen, _ = _db_generator(made)
    with pytest.raises(MachineIdsExhausted, match="machine_id_ttl"):
        gen.next_id()


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_forked_child_leases_its_own_id_and_leaves_the_parents_session_alone(
    made: list[SnowflakeGenerator],
) -> None:
    gen, keeper = _db_generator(made)
    parent_first = Snowflake(gen.next_id())
    postgres = connection.vendor == "postgresql"
    with connection.cursor() as cursor:  # this thread's session, inherited by the child
        cursor.execute("SELECT pg_backend_pid()" if postgres else "SELECT 1")
        session = cursor.fetchone()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            ids = [gen.next_id() for _ in range(5_000)] + gen.generate_ids(5_000)
            gen.close()
            os.write(write, json.dumps(ids).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ids = json.loads(pipe.read() or "[]")
    _, status = os.waitpid(pid, 0)
    assert status == 0 and len(child_ids) == 10_000 and increasing(child_ids)
    child_machine = {Snowflake(i).machine_id for i in child_ids}
    assert len(child_machine) == 1 and parent_first.machine_id not in child_machine
    released = MachineId.objects.get(pk=child_machine.pop())
    assert released.holder is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()" if postgres else "SELECT 1")
        assert cursor.fetchone() == session
    assert keeper.renew() and gen.machine_id == parent_first.machine_id
    assert gen.next_id() > parent_first


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_children_forked_while_the_keeper_queries_the_database_never_hang(
    made: list[SnowflakeGenerator],
) -> None:
    """A fork in the middle of a SQLite or libpq call would leave its mutexes locked."""
    gen, keeper = _db_generator(made)
    gen.next_id()
    stop = threading.Event()

    def churn() -> None:  # keep the keeper thread inside the database driver
        while not stop.is_set():
            keeper.renew()

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    hung = []
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit code
                code = 1
                try:
                    gen.next_id()
                    gen.close()
                    code = 0
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    hung.append(pid)
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        churner.join()
    assert not hung


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_lease_is_never_part_of_the_callers_transaction(
    made: list[SnowflakeGenerator],
) -> None:
    gen, keeper = _db_generator(made)
    if connection.vendor == "sqlite":
        # The keeper's write would wait for the lock this very transaction holds.
        with (
            pytest.raises(MachineIdUnavailable, match="outside any transaction"),
            transaction.atomic(),
        ):
            gen.next_id()
        assert not MachineId.objects.exclude(holder=None).exists()
        return
    with contextlib.suppress(RuntimeError), transaction.atomic():
        first = Snowflake(gen.next_id())
        raise RuntimeError("the caller's transaction rolls back")
    assert keeper.grant is not None
    assert MachineId.objects.get(pk=first.machine_id).holder == keeper.grant.token
