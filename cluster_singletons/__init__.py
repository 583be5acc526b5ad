"""Cluster coordination for Django + Celery.

Importing this package touches no models and does no I/O, so it is safe in settings
modules and ``celery.py``; names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster_singletons.beat.crons import cron
    from cluster_singletons.beat.deliveries import deliver_at, deliver_in
    from cluster_singletons.clock import Clock, FrozenClock, SystemClock
    from cluster_singletons.cluster.fencing import Term
    from cluster_singletons.cluster.leadership import Leadership, LeaderWork
    from cluster_singletons.cluster.runner import Runner
    from cluster_singletons.conf import ClusterSettings, get_settings
    from cluster_singletons.errors import (
        ClockMovedBackwards,
        ClusterContextRequired,
        ClusterSingletonsError,
        DatabaseUnavailable,
        DeliveryNotCancellable,
        InvalidSnowflake,
        LeadershipLost,
        MachineIdsExhausted,
        MachineIdUnavailable,
        NoClusterLock,
        ScheduleInvalid,
        SingletonConfigError,
        SingletonError,
        SnowflakeTimeOutOfRange,
        StateConflict,
        TaskKeyHeld,
        TaskKeyInvalid,
        UnknownSchedule,
        UnknownSingleton,
    )
    from cluster_singletons.fields import SnowflakeField
    from cluster_singletons.singletons.registry import singleton
    from cluster_singletons.singletons.singleton_context import SingletonContext
    from cluster_singletons.singletons.state import StateStore, state_store
    from cluster_singletons.snowflake import Snowflake, generate_id, generate_ids
    from cluster_singletons.tasks.task import SingletonTask


_WHERE = {
    "Clock": "clock",
    "FrozenClock": "clock",
    "SystemClock": "clock",
    "ClusterSettings": "conf",
    "get_settings": "conf",
    "ClusterSingletonsError": "errors",
    "DatabaseUnavailable": "errors",
    "LeadershipLost": "errors",
    "Term": "cluster.fencing",
    "Leadership": "cluster.leadership",
    "LeaderWork": "cluster.leadership",
    "Runner": "cluster.runner",
    "ClusterContextRequired": "errors",
    "SingletonConfigError": "errors",
    "SingletonError": "errors",
    "StateConflict": "errors",
    "UnknownSingleton": "errors",
    "SingletonContext": "singletons.singleton_context",
    "singleton": "singletons.registry",
    "StateStore": "singletons.state",
    "state_store": "singletons.state",
    "Snowflake": "snowflake",
    "generate_id": "snowflake",
    "generate_ids": "snowflake",
    "SnowflakeField": "fields",
    "ClockMovedBackwards": "errors",
    "InvalidSnowflake": "errors",
    "MachineIdUnavailable": "errors",
    "MachineIdsExhausted": "errors",
    "SnowflakeTimeOutOfRange": "errors",
    "ScheduleInvalid": "errors",
    "UnknownSchedule": "errors",
    "DeliveryNotCancellable": "errors",
    "cron": "beat.crons",
    "deliver_at": "beat.deliveries",
    "deliver_in": "beat.deliveries",
    "SingletonTask": "tasks.task",
    "TaskKeyInvalid": "errors",
    "TaskKeyHeld": "errors",
    "NoClusterLock": "errors",
}

#: The public API: every name of the lazy-import table.
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster_singletons' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cluster_singletons.{module}"), name)
