"""The leader-elected beat: ``celery -A project beat -S cluster_singletons.beat:LeaderScheduler``.

Holds the scheduler class Celery loads (``scheduler``), the engine the leader runs
(``engine``), the pure tick planning (``planning``), the run ledger (``ledger``), the
outbox that publishes recorded runs (``outbox``), where schedules come from (``schedule``,
``sources``, ``crons``, ``periodic_tasks``), when they tick (``timetables``), the watcher
of edits (``refresh``) and durable delayed deliveries (``deliveries``).

May import: the package's leaves, ``cluster`` (leases, fencing, leader work),
``singletons`` (a full node stands for them too) and ``snowflake`` (delivery ids).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster_singletons.beat.scheduler import LeaderScheduler

__all__ = ["LeaderScheduler"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, so importing a beat module does not import Celery's beat.
    if name == "LeaderScheduler":
        _require_installed()
        from cluster_singletons.beat.scheduler import LeaderScheduler

        return LeaderScheduler
    raise AttributeError(f"module 'cluster_singletons.beat' has no attribute {name!r}")


def _require_installed() -> None:
    """Celery's beat asks for the scheduler class: without the app installed, one line and
    exit status 1 (Celery would print the import's traceback)."""
    import logging

    from django.core.exceptions import ImproperlyConfigured

    from cluster_singletons._installed import require_installed
    from cluster_singletons.conf import refuse_to_start

    try:
        require_installed()
    except ImproperlyConfigured as exc:
        raise refuse_to_start(exc, logging.getLogger("cluster_singletons.beat")) from None
