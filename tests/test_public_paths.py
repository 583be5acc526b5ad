"""The paths users put in settings, commands, code and their own migrations keep working."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from celery.beat import Scheduler
from celery.utils.imports import symbol_by_name
from django.db.migrations.serializer import serializer_factory
from django.urls import reverse

import cluster_singletons
from cluster_singletons.beat.deliveries import cancel as cancel_delivery
from tests.fresh_interpreter import run_unconfigured

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_celery_resolves_the_scheduler_path_users_pass_to_beat() -> None:
    scheduler = symbol_by_name("cluster_singletons.beat:LeaderScheduler")
    assert issubclass(scheduler, Scheduler)
    assert scheduler.__name__ == "LeaderScheduler"


def test_the_documented_module_paths_still_import() -> None:
    from cluster_singletons import control, deliveries, urls, worker
    from cluster_singletons.context import ClusterContextFilter, current, within_cluster

    assert callable(worker.install)
    assert deliveries.cancel is cancel_delivery
    for action in ("run_now", "pause", "resume", "backfill", "prune", "handoff", "reset_state"):
        assert callable(getattr(control, action)), action
    assert {p.name for p in urls.urlpatterns} == {"live", "ready", "metrics"}
    assert reverse("cluster_singletons:ready").endswith("health/ready")
    assert callable(current) and callable(within_cluster) and ClusterContextFilter


def test_every_public_name_resolves_and_the_type_checkers_see_the_same_names() -> None:
    for name in cluster_singletons.__all__:
        assert getattr(cluster_singletons, name) is not None, name
    tree = ast.parse((ROOT / "cluster_singletons" / "__init__.py").read_text())
    typed = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module != "typing"
        and node.module != "__future__"
        for alias in node.names
    }
    assert typed == set(cluster_singletons.__all__)


def test_new_migrations_keep_referring_to_the_field_and_default_at_their_old_paths() -> None:
    from cluster_singletons.fields import SnowflakeField
    from cluster_singletons.snowflake import generate_id

    assert generate_id.__module__ == "cluster_singletons.snowflake"
    path, imports = serializer_factory(generate_id).serialize()
    assert (path, imports) == (
        "cluster_singletons.snowflake.generate_id",
        {"import cluster_singletons.snowflake"},
    )
    _, field_path, _, kwargs = SnowflakeField(primary_key=True).deconstruct()
    assert field_path == "cluster_singletons.fields.SnowflakeField"
    assert "default" not in kwargs


def test_importing_the_package_and_its_beat_path_touches_no_models() -> None:
    code = (
        "import sys, cluster_singletons, cluster_singletons.beat, cluster_singletons.snowflake\n"
        "loaded = [m for m in sys.modules if m.startswith(('cluster_singletons.models',"
        " 'django.db.models', 'celery.beat'))]\n"
        "print(loaded)\n"
    )
    out = run_unconfigured(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
