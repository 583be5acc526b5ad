from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection
from hypothesis import settings as hypothesis_settings
from pydantic import BaseModel

from cluster_singletons.singletons import registry
from cluster_singletons.singletons.state import StateStore
from project.demo import pgbouncer as pooler
from project.demo.localcluster import Cluster
from project.demo.pgbouncer import PgBouncer

# Property tests: a few examples in ``make test``, many in CI (HYPOTHESIS_PROFILE=ci).
hypothesis_settings.register_profile("dev", max_examples=8)
hypothesis_settings.register_profile("ci", max_examples=120)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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


class Progress(BaseModel):
    """The state of the ``progress`` singleton the operator tests work on."""

    cursor: int = 0


@pytest.fixture
def isolated_registry() -> Iterator[None]:
    """Only the singletons a test declares are registered while it runs."""
    saved = dict(registry._registry)
    registry._registry.clear()
    yield
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.fixture
def progress(isolated_registry: None) -> StateStore[Progress]:
    """Singleton ``progress`` declared, with ``{"cursor": 7}`` stored (version 1)."""
    registry.singleton("progress", state=Progress, interval=10)(lambda ctx: None)
    store = StateStore("singleton:progress", Progress)
    store.load()
    store.save(Progress(cursor=7))
    return store


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of the test's PostgreSQL (PostgreSQL only)."""
    if connection.vendor != "postgresql":
        pytest.skip("PgBouncer sits in front of PostgreSQL")
    db = connection.settings_dict
    try:
        bouncer = PgBouncer((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)), user=db["USER"])
    except pooler.Missing as exc:
        if os.environ.get("CLUSTER_REQUIRE_PGBOUNCER") == "1":
            raise RuntimeError(f"CLUSTER_REQUIRE_PGBOUNCER=1 but {exc}") from exc
        pytest.skip(str(exc))
    bouncer.start()
    yield bouncer
    bouncer.close()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[type[Cluster]]:
    """``Cluster`` in this test's temporary folder; every process it started is stopped."""
    started: list[Cluster] = []

    class Tracked(Cluster):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for cluster in started:
        cluster.stop()
