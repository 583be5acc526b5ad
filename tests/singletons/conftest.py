"""Fixtures of the singleton tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cluster_singletons.singletons import registry
from tests.singletons.helpers import FAST


@pytest.fixture
def fast_retries(settings: Any) -> None:
    """Failed singleton functions retry within milliseconds."""
    settings.CLUSTER_SINGLETONS = FAST


@pytest.fixture
def declared() -> Iterator[list[str]]:
    """Names the test declares (``helpers.declare``), unregistered afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        registry.unregister(name)
