"""What the Snowflake tests share: an injected clock, a machine-id source without a
database, and the constants they count from."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from dataclasses import replace

from django.db.models.functions import Now

from cluster_singletons.clock import Clock
from cluster_singletons.models import MachineId
from cluster_singletons.snowflake import machine_ids
from cluster_singletons.snowflake.contract import Grant
from cluster_singletons.snowflake.generator import (
    GeneratorConfig,
    SnowflakeGenerator,
)
from cluster_singletons.snowflake.keeper import MachineIdKeeper

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


def make_generator(
    clock: FakeClock, *ids: int, rollback: float = 0.010, belief_s: float = 3600.0
) -> tuple[SnowflakeGenerator, FixedMachineIds]:
    source = FixedMachineIds(clock, *(ids or (7,)), belief_s=belief_s)
    config = GeneratorConfig(epoch_ms=EPOCH_MS, max_clock_rollback=rollback, machine_ids=source)
    return SnowflakeGenerator(config, clock=clock), source


def increasing(ids: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(ids))


def make_keeper(clock: FakeClock | None = None) -> MachineIdKeeper:
    return MachineIdKeeper(using=USING, ttl=30.0, max_clock_behind=1.0, clock=clock)


def hold_all(by: str = "other") -> None:
    machine_ids.ensure(using=USING)
    MachineId.objects.update(holder=by, expires_at=Now() + dt.timedelta(hours=1))
