"""Whether the app's migrations are applied: asked by a runner whose registration failed."""

from __future__ import annotations

import pytest

from cluster_singletons.cluster import schema
from cluster_singletons.errors import MigrationsNotApplied

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def test_a_migrated_database_has_nothing_pending() -> None:
    assert schema.pending("default") == []
    assert schema.not_migrated("default") is None


def test_the_error_names_the_first_missing_migration_and_the_command() -> None:
    text = str(MigrationsNotApplied(["0009_longer_schedule_keys", "0010_x"], "cluster"))
    assert "2 migration(s) not applied, from 0009_longer_schedule_keys" in text
    assert text.endswith("run `python manage.py migrate --database cluster`")
