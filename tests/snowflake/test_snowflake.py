"""Snowflake ids: the format, the generator on an injected clock, and machine id leases."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from django.db import connection, models, transaction
from django.db.models.functions import Now
from django.test import override_settings
from django.test.utils import isolate_apps

from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.errors import (
    ClockMovedBackwards,
    InvalidSnowflake,
    MachineIdsExhausted,
    MachineIdUnavailable,
    SnowflakeTimeOutOfRange,
)
from cluster_singletons.fields import SnowflakeField
from cluster_singletons.models import MachineId
from cluster_singletons.snowflake import default_generator, generate_id, machine_ids
from cluster_singletons.snowflake.contract import MAX_ID, MAX_SEQUENCE, MAX_TIMESTAMP, Grant
from cluster_singletons.snowflake.generator import (
    GeneratorConfig,
    SnowflakeGenerator,
)
from cluster_singletons.snowflake.keeper import MachineIdKeeper
from cluster_singletons.snowflake.value import Snowflake
from project.demo.localcluster import ROOT

EPOCH_MS = 1_577_836_800_000
START_MS = EPOCH_MS + 10_000_000
USING = "default"


class FakeClock:
    """Wall and monotonic time that move only when told to; ``sleep`` advances both."""

    def __init__(self, wall_ms: int = START_MS) -> None:
        self.wall_ns = wall_ms * 1_000_000
        self.mono_ns = 1_000_000_000_000
        self.slept: list[float] = []

    def time_ns(self) -> int:
        return self.wall_ns

    def monotonic_ns(self) -> int:
        return self.mono_ns

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        step = max(1, round(seconds * 1e9))
        self.wall_ns += step
        self.mono_ns += step

    def step_wall(self, ms: int) -> None:
        """Step the wall clock alone, as NTP or an operator would."""
        self.wall_ns += ms * 1_000_000


class FixedMachineIds:
    """A machine id source handing out ``ids`` in turn, with a one-hour lease each."""

    def __init__(self, clock: Clock, *ids: int, belief_s: float = 3600.0) -> None:
        self.clock, self.ids, self.belief_s = clock, ids, belief_s
        self.acquired: list[Grant] = []
        self.released: list[int] = []
        self.on_change: Callable[[Grant], None] | None = None

    def acquire(self, on_change: Callable[[Grant], None]) -> None:
        self.on_change = on_change
        grant = Grant(
            machine_id=self.ids[min(len(self.acquired), len(self.ids) - 1)],
            token=f"lease-{len(self.acquired)}",
            floor_ms=0,
            reserved_until_ms=self.clock.time_ns() // 1_000_000 + int(self.belief_s * 1000),
            believed_until_ns=self.clock.monotonic_ns() + int(self.belief_s * 1e9),
        )
        self.acquired.append(grant)
        on_change(grant)

    def lose(self) -> None:
        assert self.on_change is not None
        self.on_change(replace(self.acquired[-1], held=False))

    def release(self, last_ms: int) -> None:
        self.released.append(last_ms)

    def before_fork(self) -> None:
        pass

    def after_fork_in_parent(self) -> None:
        pass

    def after_fork_in_child(self) -> None:
        pass


def _generator(
    clock: FakeClock, *ids: int, rollback: float = 0.010, belief_s: float = 3600.0
) -> tuple[SnowflakeGenerator, FixedMachineIds]:
    source = FixedMachineIds(clock, *(ids or (7,)), belief_s=belief_s)
    config = GeneratorConfig(epoch_ms=EPOCH_MS, max_clock_rollback=rollback, machine_ids=source)
    return SnowflakeGenerator(config, clock=clock), source


def _increasing(ids: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(ids))


# -- the format ----------------------------------------------------------------------------


@pytest.mark.unit
def test_parts_round_trip_through_the_int_and_the_string_form() -> None:
    sf = Snowflake.from_parts(timestamp=MAX_TIMESTAMP, machine_id=1023, sequence=4095)
    assert sf == MAX_ID == 2**63 - 1
    assert (sf.timestamp, sf.machine_id, sf.sequence) == (MAX_TIMESTAMP, 1023, 4095)
    sf = Snowflake.from_parts(timestamp=123_456_789, machine_id=513, sequence=77)
    assert (sf.timestamp, sf.machine_id, sf.sequence) == (123_456_789, 513, 77)
    assert str(sf) == str(int(sf)) and Snowflake.parse(str(sf)) == sf
    assert json.dumps({"id": str(sf)}) == f'{{"id": "{int(sf)}"}}'
    assert repr(sf) == f"Snowflake({int(sf)})" and isinstance(sf, int)


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "-1", " 1", "1_000", "1e3", "0x10", "١٢", str(2**63)])
def test_parse_accepts_only_decimal_digits_within_63_bits(text: str) -> None:
    with pytest.raises(InvalidSnowflake) as caught:
        Snowflake.parse(text)
    assert isinstance(caught.value, ValueError)


@pytest.mark.unit
@pytest.mark.parametrize("value", [-1, 2**63, True])
def test_out_of_range_values_are_not_snowflakes(value: int) -> None:
    with pytest.raises(InvalidSnowflake):
        Snowflake(value)


@pytest.mark.unit
def test_datetime_counts_from_the_configured_epoch() -> None:
    sf = Snowflake.from_parts(timestamp=1_500, machine_id=3, sequence=0)
    assert sf.datetime_at(EPOCH_MS) == dt.datetime(2020, 1, 1, 0, 0, 1, 500_000, tzinfo=dt.UTC)
    with override_settings(CLUSTER_SINGLETONS={"snowflake_epoch_ms": 0}):
        assert sf.datetime == dt.datetime(1970, 1, 1, 0, 0, 1, 500_000, tzinfo=dt.UTC)
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 10_000, tzinfo=dt.UTC)
    first = Snowflake.first_at(when, epoch_ms=EPOCH_MS)
    assert (first.datetime_at(EPOCH_MS), first.machine_id, first.sequence) == (when, 0, 0)
    for ms in range(1, 1000, 7):  # exact to the millisecond, never off by one from floats
        at = dt.datetime(2031, 5, 6, 7, 8, 9, ms * 1000, tzinfo=dt.UTC)
        assert Snowflake.first_at(at, epoch_ms=EPOCH_MS).datetime_at(EPOCH_MS) == at
    with pytest.raises(SnowflakeTimeOutOfRange):
        Snowflake.first_at(dt.datetime(2019, 1, 1, tzinfo=dt.UTC), epoch_ms=EPOCH_MS)


# -- the generator on an injected clock ----------------------------------------------------


@pytest.mark.unit
def test_ids_strictly_increase_and_carry_time_machine_id_and_sequence() -> None:
    clock = FakeClock()
    gen, _ = _generator(clock, 42)
    ids = []
    for _ in range(2_000):
        ids.append(gen.next_id())
        if len(ids) % 7 == 0:
            clock.advance(0.0003)
    assert _increasing(ids)
    first, last = Snowflake(ids[0]), Snowflake(ids[-1])
    assert (first.machine_id, first.sequence, first.timestamp) == (42, 0, START_MS - EPOCH_MS)
    assert last.timestamp == (clock.time_ns() // 1_000_000) - EPOCH_MS
    assert gen.machine_id == 42


@pytest.mark.unit
def test_an_exhausted_millisecond_waits_for_the_next_one() -> None:
    clock = FakeClock()
    gen, _ = _generator(clock)
    ids = [gen.next_id() for _ in range(MAX_SEQUENCE + 1)]
    assert {Snowflake(i).timestamp for i in ids} == {START_MS - EPOCH_MS}
    assert [Snowflake(i).sequence for i in ids] == list(range(4096)) and not clock.slept
    nxt = Snowflake(gen.next_id())
    assert (nxt.timestamp, nxt.sequence) == (START_MS - EPOCH_MS + 1, 0)
    assert sum(clock.slept) == pytest.approx(0.001)


@pytest.mark.unit
def test_a_small_clock_step_back_is_waited_out_and_never_gives_a_smaller_id() -> None:
    clock = FakeClock()
    gen, _ = _generator(clock, rollback=0.010)
    before = gen.next_id()
    clock.step_wall(-5)
    after = gen.next_id()
    assert after > before
    assert Snowflake(after).timestamp == Snowflake(before).timestamp
    assert sum(clock.slept) == pytest.approx(0.005)


@pytest.mark.unit
def test_a_large_clock_step_back_raises_until_the_clock_catches_up() -> None:
    clock = FakeClock()
    gen, _ = _generator(clock, rollback=0.010)
    before = gen.next_id()
    clock.step_wall(-50)
    with pytest.raises(ClockMovedBackwards) as caught:
        gen.next_id()
    assert (caught.value.behind_ms, caught.value.bound_ms) == (50, 10)
    assert "max_clock_rollback" in str(caught.value) and not clock.slept
    clock.step_wall(45)  # 5 ms behind: within the bound again
    assert gen.next_id() > before


@pytest.mark.unit
def test_ids_exist_only_within_41_bits_of_milliseconds_after_the_epoch() -> None:
    clock = FakeClock(wall_ms=EPOCH_MS - 1)
    gen, _ = _generator(clock)
    with pytest.raises(SnowflakeTimeOutOfRange, match="before 'snowflake_epoch_ms'"):
        gen.next_id()
    clock.step_wall(1)
    assert Snowflake(gen.next_id()).timestamp == 0

    clock = FakeClock(wall_ms=EPOCH_MS + MAX_TIMESTAMP)
    gen, _ = _generator(clock, 1023)
    last = Snowflake(gen.next_id())
    assert (last.timestamp, last.machine_id) == (MAX_TIMESTAMP, 1023) and last <= MAX_ID
    clock.step_wall(1)
    with pytest.raises(SnowflakeTimeOutOfRange, match="ran out"):
        gen.next_id()


@pytest.mark.unit
def test_generate_ids_fills_whole_milliseconds_in_order() -> None:
    clock = FakeClock()
    gen, _ = _generator(clock, 5)
    assert gen.generate_ids(0) == []
    gen.next_id()  # sequence 0 of the first millisecond is taken
    ids = gen.generate_ids(10_000)
    assert len(ids) == 10_000 and _increasing(ids)
    per_ms = Counter(Snowflake(i).timestamp for i in ids)
    assert sorted(per_ms.values(), reverse=True) == [4096, 4095, 1809]
    # Within a millisecond the ids are consecutive integers.
    assert ids[4094] - ids[0] == 4094 and Snowflake(ids[4095]).sequence == 0


@pytest.mark.unit
def test_belief_in_the_lease_ends_by_the_monotonic_clock() -> None:
    clock = FakeClock()
    gen, source = _generator(clock, 3, belief_s=1.0)
    gen.next_id()
    clock.advance(0.999)
    gen.next_id()
    assert len(source.acquired) == 1
    clock.advance(0.002)
    gen.next_id()
    assert len(source.acquired) == 2


@pytest.mark.unit
def test_a_lost_lease_stops_ids_at_once_and_the_next_machine_id_still_increases() -> None:
    clock = FakeClock()
    gen, source = _generator(clock, 900, 2)
    before = gen.next_id()
    source.lose()
    assert gen.machine_id is None
    after = Snowflake(gen.next_id())  # same wall millisecond, smaller machine id
    assert after.machine_id == 2 and after > before
    assert after.timestamp == Snowflake(before).timestamp + 1


@pytest.mark.unit
def test_close_releases_with_the_last_issued_millisecond() -> None:
    clock = FakeClock()
    gen, source = _generator(clock)
    last = gen.next_id()
    gen.close()
    assert source.released == [Snowflake(last).timestamp + EPOCH_MS]
    assert gen.machine_id is None
    assert gen.next_id() > last and len(source.acquired) == 2


@pytest.mark.unit
@pytest.mark.parametrize("lock_free", [True, False], ids=["lock-free", "locked"])
def test_threads_share_one_sequence_without_duplicates(lock_free: bool) -> None:
    gen = SnowflakeGenerator(
        GeneratorConfig(
            epoch_ms=EPOCH_MS,
            max_clock_rollback=1.0,
            machine_ids=FixedMachineIds(SystemClock(), 11),
        ),
        lock_free=lock_free,
    )
    results: dict[int, list[int]] = {}

    def work(n: int) -> None:
        results[n] = [gen.next_id() for _ in range(20_000)] + gen.generate_ids(20_000)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads inside the hot path as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    everything = [i for ids in results.values() for i in ids]
    assert len(set(everything)) == len(everything) == 160_000
    assert all(_increasing(ids) for ids in results.values())


@pytest.mark.unit
def test_a_forked_child_reuses_neither_the_machine_id_nor_the_sequence() -> None:
    clock = FakeClock()
    gen, _ = _generator(clock, 100, 200)
    parent_ids = [gen.next_id() for _ in range(10)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, json.dumps([gen.next_id() for _ in range(10)]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ids = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert {Snowflake(i).machine_id for i in child_ids} == {200}
    assert Snowflake(child_ids[0]).sequence == 0
    assert Snowflake(gen.next_id()).machine_id == 100 and gen.next_id() > parent_ids[-1]


@pytest.mark.unit
def test_import_does_no_io_and_an_unconfigured_process_gets_a_clear_error() -> None:
    code = (
        "import cluster_singletons.snowflake as s\n"
        "try:\n    s.generate_id()\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MachineIdUnavailable"), out.stdout
    assert "django.setup()" in out.stdout and "migrate" in out.stdout


# -- machine ids in the database -----------------------------------------------------------


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


def _hold_all(by: str = "other") -> None:
    machine_ids.ensure(using=USING)
    MachineId.objects.update(holder=by, expires_at=Now() + dt.timedelta(hours=1))


def _keeper(clock: FakeClock | None = None) -> MachineIdKeeper:
    return MachineIdKeeper(using=USING, ttl=30.0, max_clock_behind=1.0, clock=clock)


@pytest.fixture
def made() -> Iterator[list[SnowflakeGenerator]]:
    generators: list[SnowflakeGenerator] = []
    yield generators
    for gen in generators:
        gen.close()


def _db_generator(made: list[SnowflakeGenerator]) -> tuple[SnowflakeGenerator, MachineIdKeeper]:
    keeper = _keeper()
    config = GeneratorConfig(epoch_ms=EPOCH_MS, max_clock_rollback=1.0, machine_ids=keeper)
    gen = SnowflakeGenerator(config)
    made.append(gen)
    return gen, keeper


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
    _hold_all()
    assert _lease() is None
    keeper = _keeper()
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
    _hold_all()
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


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_generator_leases_on_its_first_id_and_releases_on_close(
    made: list[SnowflakeGenerator],
) -> None:
    gen, keeper = _db_generator(made)
    assert not MachineId.objects.exists()  # building it did no I/O
    ids = [gen.next_id() for _ in range(1_000)] + gen.generate_ids(10_000)
    assert _increasing(ids)
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
    _hold_all()
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
    assert status == 0 and len(child_ids) == 10_000 and _increasing(child_ids)
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


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
@isolate_apps("cluster_singletons")
def test_snowflake_field_is_a_primary_key_defaulting_to_a_new_id() -> None:
    class Order(models.Model):
        id = SnowflakeField(primary_key=True)
        note = models.CharField(max_length=20, default="")

        class Meta:
            app_label = "cluster_singletons"

    assert SnowflakeField(primary_key=True).deconstruct()[3] == {"primary_key": True}
    assert SnowflakeField(editable=True).deconstruct()[3] == {"editable": True}
    assert not Order._meta.pk.editable  # type: ignore[union-attr]
    with connection.schema_editor() as editor:
        editor.create_model(Order)
    try:
        made = [Order.objects.create(note=str(n)) for n in range(3)]
        made += Order.objects.bulk_create([Order(note="bulk") for _ in range(3)])
        pks = [o.pk for o in made]
        assert _increasing(pks)
        assert list(Order.objects.order_by("pk").values_list("pk", flat=True)) == pks
        assert {Snowflake(pk).machine_id for pk in pks} == {default_generator().machine_id}
        assert Order.objects.get(pk=Snowflake.parse(str(pks[0]))).note == "0"
        assert generate_id() > pks[-1]
    finally:
        default_generator().close()
        with connection.schema_editor() as editor:
            editor.delete_model(Order)
