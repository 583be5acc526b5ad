"""The Snowflake contract: the id's bit layout, and what a machine-id source grants.

Layout (Twitter's): 1 zero bit, 41 bits of milliseconds since ``snowflake_epoch_ms``,
10 bits of machine id, 12 bits of sequence. Every process holds its own machine id, leased
from the database (``keeper``); nothing is configured by hand. The generator and the
keeper both import this module and nothing else of each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

TIMESTAMP_BITS, MACHINE_ID_BITS, SEQUENCE_BITS = 41, 10, 12
MAX_TIMESTAMP = (1 << TIMESTAMP_BITS) - 1
MAX_MACHINE_ID = (1 << MACHINE_ID_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_ID = (1 << (TIMESTAMP_BITS + MACHINE_ID_BITS + SEQUENCE_BITS)) - 1
#: The format's limit: 4,096 ids per millisecond per machine id.
IDS_PER_SECOND_LIMIT = (MAX_SEQUENCE + 1) * 1000
TIMESTAMP_SHIFT = MACHINE_ID_BITS + SEQUENCE_BITS


@dataclass(frozen=True, kw_only=True)
class Grant:
    """A machine id this process may use, and the bounds of that use."""

    machine_id: int
    #: Names this lease (a fresh token on every acquisition).
    token: str
    #: Unix ms: ids issued under this machine id before this lease are not later than this.
    floor_ms: int
    #: Unix ms: ids may carry timestamps up to this one under this lease.
    reserved_until_ms: int
    #: Monotonic ns (of the generator's clock): ids may be issued until then.
    believed_until_ns: int
    #: False once the lease is known to be lost.
    held: bool = True


class MachineIdSource(Protocol):
    """Where a generator's machine id comes from: the database, or a test double."""

    def acquire(self, on_change: Callable[[Grant], None]) -> None:
        """Block until ``on_change`` was given a held grant (renewed, or a new lease).

        Later renewals and a loss are reported through ``on_change`` too, one at a time.
        """
        ...

    def release(self, last_ms: int) -> None:
        """Give the machine id back; no id issued with it has a timestamp after ``last_ms``."""
        ...

    def before_fork(self) -> None:
        """Just before ``fork()``: let no database call of this source be in flight."""
        ...

    def after_fork_in_parent(self) -> None: ...

    def after_fork_in_child(self) -> None:
        """In the child: drop the parent's lease and threads without any I/O."""
        ...
