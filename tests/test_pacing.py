from __future__ import annotations

import pytest

from cluster_singletons.pacing import Backoff

pytestmark = pytest.mark.unit


def test_backoff_doubles_and_caps_and_resets() -> None:
    backoff = Backoff(initial=0.5, maximum=3.0)
    delays = []
    for _ in range(5):
        delays.append(backoff.delay)
        backoff = backoff.failed()
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.reset().delay == 0.5


def test_backoff_survives_very_many_failures() -> None:
    assert Backoff(initial=1.0, maximum=10.0, failures=10_000).delay == 10.0
