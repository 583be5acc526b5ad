"""The Snowflake generator: issues ids for one process, thread-safe and fork-safe.

Invariants the generator keeps:

- No id is ever issued twice. Ids strictly increase across machine id changes and clock
  steps: in each thread, and between any two calls of which one returns before the other
  starts (the calls are linearizable).
- An id is issued only while the machine id's lease is believed held: until the renewal's
  send time + TTL - margin by the monotonic clock, and with a timestamp no later than the
  one the lease reserved in the database.
- A wall clock that steps back is waited out up to ``max_clock_rollback``; beyond that
  ``ClockMovedBackwards`` is raised. A full millisecond (4,096 ids) waits for the next one.
- A forked child starts afresh: no machine id, no sequence; its first id leases its own.

Importing this module does no I/O: the machine id is asked for on the first id.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.errors import ClockMovedBackwards, SnowflakeTimeOutOfRange
from cluster_singletons.snowflake.contract import (
    MAX_SEQUENCE,
    MAX_TIMESTAMP,
    SEQUENCE_BITS,
    TIMESTAMP_SHIFT,
    Grant,
    MachineIdSource,
)

_NEVER = -(1 << 62)
_Window = tuple[int, int, Iterator[int], Callable[[], int]]
_CLOSED: _Window = (1, 0, iter(()), iter(()).__next__)  # matches no time
_GIL_ENABLED: bool = getattr(sys, "_is_gil_enabled", lambda: True)()


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    epoch_ms: int
    max_clock_rollback: float
    machine_ids: MachineIdSource


class SnowflakeGenerator:
    """Issues Snowflake ids for one process; thread-safe and fork-safe (see module docs).

    ``config`` may be a callable, called on the first id, so building a generator does
    no I/O and reads no settings. ``lock_free`` (default: whether the interpreter has a
    GIL) picks the hot path: lock-free draws from a ``range`` iterator, whose ``__next__``
    is one atomic C call under the GIL, or the same path under the generator's lock.
    """

    def __init__(
        self,
        config: GeneratorConfig | Callable[[], GeneratorConfig],
        *,
        clock: Clock | None = None,
        lock_free: bool | None = None,
    ) -> None:
        self._make_config = config if callable(config) else (lambda: config)
        self._config: GeneratorConfig | None = None
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        # The current millisecond's window, replaced whole (a tuple) so that a reader
        # never mixes two windows: (start ns, end ns, iterator over its ids, its __next__).
        self._window: list[_Window] = [_CLOSED]
        self._reset()
        self._epoch_ms = 0
        self.next_id = self._compile(_GIL_ENABLED if lock_free is None else lock_free)
        _GENERATORS.add(self)

    def _reset(self) -> None:
        self._window[0] = _CLOSED
        self._token: str | None = None
        self._last_ms = -1  # no id at or before this millisecond may be issued anew
        self._bits = 0
        self._reserved_ms = -1
        self._until_ns = _NEVER

    def _compile(self, lock_free: bool) -> Callable[[], int]:
        box, now_ns, slow = self._window, self._clock.time_ns, self._next_id_slow
        acquire, release = self._lock.acquire, self._lock.release

        # The hot path: one clock read and one atomic draw from the window's ids (a
        # range iterator: its __next__ is one C call). The window covers one millisecond
        # of one lease; anything else (a new millisecond, a used-up sequence, a clock
        # step back, no lease) is the slow path.
        def next_id() -> int:
            """A new Snowflake id, as a plain ``int``; ids of one process strictly increase."""
            w = box[0]
            now = now_ns()
            if w[0] <= now < w[1]:
                try:
                    return w[3]()
                except StopIteration:
                    pass
            return slow()

        def next_id_locked() -> int:
            """A new Snowflake id, as a plain ``int``; ids of one process strictly increase."""
            acquire()
            try:
                w = box[0]
                now = now_ns()
                if w[0] <= now < w[1]:
                    try:
                        return w[3]()
                    except StopIteration:
                        pass
            finally:
                release()
            return slow()

        return next_id if lock_free else next_id_locked

    def generate_ids(self, n: int) -> list[int]:
        """``n`` new ids in increasing order, taking whole milliseconds' sequences at once."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        out: list[int] = []
        while len(out) < n:
            out.extend(self._take(n - len(out)))
        return out

    @property
    def machine_id(self) -> int | None:
        """The machine id in use, or None when none is held."""
        with self._lock:
            return None if self._until_ns == _NEVER else self._bits >> SEQUENCE_BITS

    def close(self) -> None:
        """Release the machine id now (at exit, for instance); the next id leases one again."""
        config = self._config
        if config is None:
            return
        with self._lock:
            self._window[0] = _CLOSED
            self._token, self._reserved_ms, self._until_ns = None, -1, _NEVER
            last_ms = max(self._last_ms, 0) + self._epoch_ms
        config.machine_ids.release(last_ms)

    # -- slow path -------------------------------------------------------------------------

    def _next_id_slow(self) -> int:
        return self._take(1)[0]

    def _take(self, n: int) -> list[int]:
        """Issue up to ``n`` increasing ids of one millisecond, waiting or leasing as needed."""
        clock = self._clock
        while True:
            config = self._config or self._configure()
            with self._lock:
                now = clock.time_ns()
                epoch = self._epoch_ms
                ms = now // 1_000_000 - epoch
                if not 0 <= ms <= MAX_TIMESTAMP:
                    raise SnowflakeTimeOutOfRange(ms + epoch, epoch)
                target: int | None
                if not (ms <= self._reserved_ms and clock.monotonic_ns() < self._until_ns):
                    target = None  # no machine id believed held: lease or renew one
                elif ms < self._last_ms:
                    bound = int(config.max_clock_rollback * 1000)
                    if self._last_ms - ms > bound:
                        raise ClockMovedBackwards(self._last_ms - ms, bound)
                    target = self._last_ms
                else:
                    if ms > self._last_ms:
                        self._open(ms)
                    ids = self._draw(n, (ms + epoch) * 1_000_000)
                    if ids:
                        return ids
                    target = ms + 1  # this millisecond is used up, or closed by a new lease
            if target is None:
                config.machine_ids.acquire(self._apply)
            else:
                clock.sleep(((target + epoch) * 1_000_000 - now) / 1e9)

    def _open(self, ms: int) -> None:
        base = ms << TIMESTAMP_SHIFT | self._bits
        ids = iter(range(base, base + MAX_SEQUENCE + 1))
        start = (ms + self._epoch_ms) * 1_000_000
        self._window[0] = (start, start + 1_000_000, ids, ids.__next__)
        self._last_ms = ms

    def _draw(self, n: int, start_ns: int) -> list[int]:
        """Up to ``n`` ids from the window of the millisecond starting at ``start_ns``."""
        w = self._window[0]
        if w[0] != start_ns:
            return []
        # Each draw is atomic: ids the hot path takes meanwhile are skipped, never repeated.
        return list(itertools.islice(w[2], n))

    def _apply(self, grant: Grant) -> None:
        """Take a grant from the machine id source (a new lease, a renewal or a loss)."""
        with self._lock:
            if grant.token != self._token:
                if not grant.held:
                    return
                self._token = grant.token
                self._window[0] = _CLOSED
                # Start after every earlier id of this machine id, and in a later
                # millisecond than this generator's last id even if the new id is smaller.
                self._last_ms = max(self._last_ms, grant.floor_ms - self._epoch_ms)
                self._bits = grant.machine_id << SEQUENCE_BITS
            if grant.held:
                self._reserved_ms = min(grant.reserved_until_ms - self._epoch_ms, MAX_TIMESTAMP)
                self._until_ns = grant.believed_until_ns
            else:
                self._window[0] = _CLOSED
                self._reserved_ms, self._until_ns = -1, _NEVER

    def _configure(self) -> GeneratorConfig:
        with self._setup_lock:
            if self._config is None:
                config = self._make_config()
                with self._lock:
                    self._epoch_ms = config.epoch_ms
                self._config = config
            return self._config

    # Around fork(): the source first (its thread may be waiting for our lock), then our
    # lock, so the child copies consistent state and no lock or library call (SQLite's
    # own mutexes) held by a thread that does not exist in the child.

    def _before_fork(self) -> None:
        if self._config is not None:
            self._config.machine_ids.before_fork()
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()
        if self._config is not None:
            self._config.machine_ids.after_fork_in_parent()

    def _after_fork_in_child(self) -> None:
        self._reset()
        self._setup_lock = threading.Lock()
        if self._config is not None:
            self._config.machine_ids.after_fork_in_child()
        self._lock.release()


# -- process-wide wiring ---------------------------------------------------------------------

_GENERATORS: weakref.WeakSet[SnowflakeGenerator] = weakref.WeakSet()
_FORKING: list[SnowflakeGenerator] = []


def _before_fork() -> None:
    _FORKING[:] = list(_GENERATORS)
    for generator in _FORKING:
        generator._before_fork()


def _after_fork_in_parent() -> None:
    for generator in _FORKING:
        generator._after_fork_in_parent()
    _FORKING.clear()


def _after_fork_in_child() -> None:
    for generator in _FORKING:
        generator._after_fork_in_child()
    _FORKING.clear()


def _release_at_exit() -> None:
    for generator in list(_GENERATORS):
        with contextlib.suppress(Exception):  # the lease expires by itself; never fail an exit
            generator.close()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
atexit.register(_release_at_exit)
