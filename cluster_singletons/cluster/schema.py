"""Whether this app's migrations are applied on the cluster's database.

Asked only after a statement failed (a runner's registration), to tell "run migrate" from
an unreachable server at once rather than after ``startup_timeout``. Reads Django's
migration records; writes nothing, so nothing here is fenced.
"""

from __future__ import annotations

from django.db import connections
from django.db.migrations.executor import MigrationExecutor

from cluster_singletons._connection import DATABASE_ERRORS
from cluster_singletons.errors import MigrationsNotApplied

APP = "cluster_singletons"


def pending(using: str) -> list[str]:
    """The names of this app's migrations not applied on ``using``, in order (raises the
    database's error when it cannot be asked)."""
    executor = MigrationExecutor(connections[using])
    targets = [key for key in executor.loader.graph.leaf_nodes() if key[0] == APP]
    return [m.name for m, backwards in executor.migration_plan(targets) if not backwards]


def not_migrated(using: str) -> MigrationsNotApplied | None:
    """The error to give up with when the database answers but migrations are missing;
    None when they are applied or the database cannot be asked (it is unreachable)."""
    try:
        missing = pending(using)
    except DATABASE_ERRORS:
        return None
    return MigrationsNotApplied(missing, using) if missing else None
