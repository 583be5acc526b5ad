"""Fixtures of the cluster tests."""

from __future__ import annotations

import pytest

from cluster_singletons.cluster import leases


@pytest.fixture
def lease() -> str:
    """The ``beat`` lease, created free."""
    leases.ensure(["beat"], using="default")
    return "beat"
