"""State schema versions: declaration checks and decoding with upgrades (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from cluster_singletons.singletons.state_versions import DecodeError, decode, problems

pytestmark = pytest.mark.unit


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"count": data["n"]}


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "label": "x"}


class V3(BaseModel):
    schema_version: ClassVar[int] = 3
    upgrades: ClassVar[Mapping[int, Any]] = {1: _v1_to_v2, 2: _v2_to_v3}
    count: int = 0
    label: str = ""


def test_an_old_value_is_upgraded_step_by_step() -> None:
    decoded = decode(V3, '{"n": 4}', 1)
    assert decoded.value == V3(count=4, label="x") and decoded.upgraded_from == 1
    assert decode(V3, '{"count": 1, "label": "y"}', 3).upgraded_from is None


@pytest.mark.parametrize(
    ("text", "version", "message"),
    [
        ('{"count": 1}', 4, "newer"),
        ("{not json", 3, "not valid JSON"),
        ('{"m": 1}', 1, "upgrade from version 1 failed"),
        ('{"count": "many"}', 3, "does not match V3"),
    ],
)
def test_a_value_that_cannot_be_decoded_says_why_and_is_never_truncated(
    text: str, version: int, message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(V3, text, version)


def test_declarations_with_gaps_or_bad_versions_are_named() -> None:
    class Gap(BaseModel):
        schema_version: ClassVar[int] = 3
        upgrades: ClassVar[Mapping[int, Any]] = {1: _v1_to_v2}

    class Zero(BaseModel):
        schema_version: ClassVar[int] = 0

    assert problems(V3) == []
    assert problems(Gap) == [
        "Gap is schema version 3 but has no upgrade from version 2 (add upgrades[2])"
    ]
    assert "schema_version must be an int >= 1" in problems(Zero)[0]
    assert "pydantic BaseModel" in problems(dict)[0]
