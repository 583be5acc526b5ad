"""Snowflake ids: 64-bit, time-sortable, unique across the cluster.

Holds the id's contract (``contract``: bit layout, the machine-id grant), the value type
(``value``), the generator (``generator``), the machine-id lease store (``machine_ids``)
and the keeper thread that holds one (``keeper``). This module wires the process-wide
generator: ``generate_id`` is the path ``SnowflakeField`` defaults write into users'
migrations, so it lives here and never moves.

May import: the package's leaves only. Importing it does no I/O: the database is asked
on the first id.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import cast

from django.core.exceptions import AppRegistryNotReady, ImproperlyConfigured

from cluster_singletons.errors import MachineIdUnavailable
from cluster_singletons.snowflake.generator import GeneratorConfig, SnowflakeGenerator
from cluster_singletons.snowflake.value import Snowflake

__all__ = ["Snowflake", "SnowflakeGenerator", "default_generator", "generate_id", "generate_ids"]


def _config_from_settings() -> GeneratorConfig:
    """The generator's configuration from the settings, with a keeper of a leased machine id."""
    try:
        # Here, not at the top: the keeper's store needs the models, and this module is
        # imported before Django is set up (settings modules, ``celery.py``).
        from cluster_singletons.conf import get_settings
        from cluster_singletons.snowflake.keeper import MachineIdKeeper

        settings = get_settings()
    except (ImproperlyConfigured, AppRegistryNotReady) as exc:
        raise MachineIdUnavailable(None, exc) from exc
    keeper = MachineIdKeeper(
        using=settings.database,
        ttl=settings.machine_id_ttl,
        max_clock_behind=settings.max_clock_rollback,
        retry_backoff=settings.retry_backoff,
        retry_backoff_max=settings.retry_backoff_max,
    )
    return GeneratorConfig(
        epoch_ms=settings.snowflake_epoch_ms,
        max_clock_rollback=settings.max_clock_rollback,
        machine_ids=keeper,
    )


_DEFAULT = SnowflakeGenerator(_config_from_settings)

#: A new Snowflake id from this process's generator, as a plain ``int``. This is the
#: generator's compiled hot path itself, so a call costs no extra Python frame.
generate_id: Callable[[], int] = _DEFAULT.next_id
# Named for where it is, so pickle and Django's migration writer find it by reference.
cast(types.FunctionType, generate_id).__module__ = __name__
cast(types.FunctionType, generate_id).__name__ = "generate_id"
cast(types.FunctionType, generate_id).__qualname__ = "generate_id"


def generate_ids(n: int) -> list[int]:
    """``n`` new ids in increasing order, filling whole milliseconds at the format's limit."""
    return _DEFAULT.generate_ids(n)


def default_generator() -> SnowflakeGenerator:
    """The process-wide generator behind ``generate_id`` and ``SnowflakeField``."""
    return _DEFAULT
