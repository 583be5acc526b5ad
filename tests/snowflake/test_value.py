"""Snowflake values: the parts of an id, its string form, its time."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.test import override_settings

from cluster_singletons.errors import (
    InvalidSnowflake,
    SnowflakeTimeOutOfRange,
)
from cluster_singletons.snowflake.contract import MAX_ID, MAX_TIMESTAMP
from cluster_singletons.snowflake.value import Snowflake
from tests.snowflake.helpers import EPOCH_MS


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
