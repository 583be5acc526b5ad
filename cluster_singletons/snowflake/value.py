"""``Snowflake``: an id as a value, an ``int`` that knows its time, machine id and sequence."""

from __future__ import annotations

import datetime as dt

from cluster_singletons.errors import InvalidSnowflake, SnowflakeTimeOutOfRange
from cluster_singletons.snowflake.contract import (
    MAX_ID,
    MAX_MACHINE_ID,
    MAX_SEQUENCE,
    MAX_TIMESTAMP,
    SEQUENCE_BITS,
    TIMESTAMP_SHIFT,
)

_UNIX_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Snowflake(int):
    """A Snowflake id: an ``int`` that knows its parts.

    ``str()`` gives the decimal form for JSON (JavaScript numbers hold only 53 bits);
    ``Snowflake.parse`` reads it back.
    """

    __slots__ = ()

    def __new__(cls, value: int) -> Snowflake:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise InvalidSnowflake(value)
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Snowflake:
        """Read the decimal string form (digits only); ``InvalidSnowflake`` otherwise."""
        if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) < 20):
            raise InvalidSnowflake(text)
        return cls(int(text))

    @classmethod
    def from_parts(cls, *, timestamp: int, machine_id: int, sequence: int) -> Snowflake:
        """The id with these parts (``timestamp`` in milliseconds since the epoch)."""
        if not (
            0 <= timestamp <= MAX_TIMESTAMP
            and 0 <= machine_id <= MAX_MACHINE_ID
            and 0 <= sequence <= MAX_SEQUENCE
        ):
            raise InvalidSnowflake((timestamp, machine_id, sequence))
        return cls(timestamp << TIMESTAMP_SHIFT | machine_id << SEQUENCE_BITS | sequence)

    @classmethod
    def first_at(cls, when: dt.datetime, *, epoch_ms: int | None = None) -> Snowflake:
        """The smallest id of (aware) ``when``'s millisecond: ``pk__gte=Snowflake.first_at(t)``."""
        epoch = _configured_epoch_ms() if epoch_ms is None else epoch_ms
        ms = (when - _UNIX_EPOCH) // dt.timedelta(milliseconds=1) - epoch  # exact, no float
        if not 0 <= ms <= MAX_TIMESTAMP:
            raise SnowflakeTimeOutOfRange(ms + epoch, epoch)
        return cls.from_parts(timestamp=ms, machine_id=0, sequence=0)

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch."""
        return self >> TIMESTAMP_SHIFT

    @property
    def machine_id(self) -> int:
        return (self >> SEQUENCE_BITS) & MAX_MACHINE_ID

    @property
    def sequence(self) -> int:
        return self & MAX_SEQUENCE

    @property
    def datetime(self) -> dt.datetime:
        """When the id was issued (UTC), by the configured ``snowflake_epoch_ms``."""
        return self.datetime_at(_configured_epoch_ms())

    def datetime_at(self, epoch_ms: int) -> dt.datetime:
        """When the id was issued (UTC), for ids counted from ``epoch_ms``."""
        return _UNIX_EPOCH + dt.timedelta(milliseconds=self.timestamp + epoch_ms)

    def __repr__(self) -> str:
        return f"Snowflake({int(self)})"

    __str__ = int.__repr__


def _configured_epoch_ms() -> int:
    from cluster_singletons.conf import get_settings

    return get_settings().snowflake_epoch_ms
