from __future__ import annotations

import os

import pytest
from django.db import connection


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``postgres`` run only against PostgreSQL; CI demands they run there."""
    vendor = connection.vendor
    if os.environ.get("CLUSTER_REQUIRE_POSTGRES") == "1" and vendor != "postgresql":
        raise pytest.UsageError(
            "CLUSTER_REQUIRE_POSTGRES=1 but the database is "
            f"{vendor}; set DATABASE_URL=postgres://..."
        )
    if vendor == "postgresql":
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("postgres") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
