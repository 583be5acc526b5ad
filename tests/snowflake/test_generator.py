"""Snowflake ids: the format, the generator on an injected clock, and machine id leases."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter

import pytest

from cluster_singletons.clock import SystemClock
from cluster_singletons.errors import (
    ClockMovedBackwards,
    SnowflakeTimeOutOfRange,
)
from cluster_singletons.snowflake.contract import MAX_ID, MAX_SEQUENCE, MAX_TIMESTAMP
from cluster_singletons.snowflake.generator import (
    GeneratorConfig,
    SnowflakeGenerator,
)
from cluster_singletons.snowflake.value import Snowflake
from tests.fresh_interpreter import run_unconfigured
from tests.snowflake.helpers import (
    EPOCH_MS,
    START_MS,
    FakeClock,
    FixedMachineIds,
    increasing,
    make_generator,
)

# -- the format ----------------------------------------------------------------------------


# -- the generator on an injected clock ----------------------------------------------------


@pytest.mark.unit
def test_ids_strictly_increase_and_carry_time_machine_id_and_sequence() -> None:
    clock = FakeClock()
    gen, _ = make_generator(clock, 42)
    ids = []
    for _ in range(2_000):
        ids.append(gen.next_id())
        if len(ids) % 7 == 0:
            clock.advance(0.0003)
    assert increasing(ids)
    first, last = Snowflake(ids[0]), Snowflake(ids[-1])
    assert (first.machine_id, first.sequence, first.timestamp) == (42, 0, START_MS - EPOCH_MS)
    assert last.timestamp == (clock.time_ns() // 1_000_000) - EPOCH_MS
    assert gen.machine_id == 42


@pytest.mark.unit
def test_an_exhausted_millisecond_waits_for_the_next_one() -> None:
    clock = FakeClock()
    gen, _ = make_generator(clock)
    ids = [gen.next_id() for _ in range(MAX_SEQUENCE + 1)]
    assert {Snowflake(i).timestamp for i in ids} == {START_MS - EPOCH_MS}
    assert [Snowflake(i).sequence for i in ids] == list(range(4096)) and not clock.slept
    nxt = Snowflake(gen.next_id())
    assert (nxt.timestamp, nxt.sequence) == (START_MS - EPOCH_MS + 1, 0)
    assert sum(clock.slept) == pytest.approx(0.001)


@pytest.mark.unit
def test_a_small_clock_step_back_is_waited_out_and_never_gives_a_smaller_id() -> None:
    clock = FakeClock()
    gen, _ = make_generator(clock, rollback=0.010)
    before = gen.next_id()
    clock.step_wall(-5)
    after = gen.next_id()
    assert after > before
    assert Snowflake(after).timestamp == Snowflake(before).timestamp
    assert sum(clock.slept) == pytest.approx(0.005)


@pytest.mark.unit
def test_a_large_clock_step_back_raises_until_the_clock_catches_up() -> None:
    clock = FakeClock()
    gen, _ = make_generator(clock, rollback=0.010)
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
    gen, _ = make_generator(clock)
    with pytest.raises(SnowflakeTimeOutOfRange, match="before 'snowflake_epoch_ms'"):
        gen.next_id()
    clock.step_wall(1)
    assert Snowflake(gen.next_id()).timestamp == 0

    clock = FakeClock(wall_ms=EPOCH_MS + MAX_TIMESTAMP)
    gen, _ = make_generator(clock, 1023)
    last = Snowflake(gen.next_id())
    assert (last.timestamp, last.machine_id) == (MAX_TIMESTAMP, 1023) and last <= MAX_ID
    clock.step_wall(1)
    with pytest.raises(SnowflakeTimeOutOfRange, match="ran out"):
        gen.next_id()


@pytest.mark.unit
def test_generate_ids_fills_whole_milliseconds_in_order() -> None:
    clock = FakeClock()
    gen, _ = make_generator(clock, 5)
    assert gen.generate_ids(0) == []
    gen.next_id()  # sequence 0 of the first millisecond is taken
    ids = gen.generate_ids(10_000)
    assert len(ids) == 10_000 and increasing(ids)
    per_ms = Counter(Snowflake(i).timestamp for i in ids)
    assert sorted(per_ms.values(), reverse=True) == [4096, 4095, 1809]
    # Within a millisecond the ids are consecutive integers.
    assert ids[4094] - ids[0] == 4094 and Snowflake(ids[4095]).sequence == 0


@pytest.mark.unit
def test_belief_in_the_lease_ends_by_the_monotonic_clock() -> None:
    clock = FakeClock()
    gen, source = make_generator(clock, 3, belief_s=1.0)
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
    gen, source = make_generator(clock, 900, 2)
    before = gen.next_id()
    source.lose()
    assert gen.machine_id is None
    after = Snowflake(gen.next_id())  # same wall millisecond, smaller machine id
    assert after.machine_id == 2 and after > before
    assert after.timestamp == Snowflake(before).timestamp + 1


@pytest.mark.unit
def test_close_releases_with_the_last_issued_millisecond() -> None:
    clock = FakeClock()
    gen, source = make_generator(clock)
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
    assert all(increasing(ids) for ids in results.values())


@pytest.mark.unit
def test_a_forked_child_reuses_neither_the_machine_id_nor_the_sequence() -> None:
    clock = FakeClock()
    gen, _ = make_generator(clock, 100, 200)
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
    out = run_unconfigured(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MachineIdUnavailable"), out.stdout
    assert "django.setup()" in out.stdout and "migrate" in out.stdout


# -- machine ids in the database -----------------------------------------------------------
