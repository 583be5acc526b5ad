"""Celery worker bootstep: let a worker node host singletons (opt-in).

``install(app)`` adds a ``--cluster`` worker option. A worker started with it runs a
runner in its main process, standing for every singleton (not the beat lease), spread
with the other runners; warm shutdown hands its singletons off. A runner that gives up
(its database unreachable for ``startup_timeout``, migrations not applied) or crashes
stops the worker with exit status 1, as ``runcluster`` and the beat exit. Without the
option the step does nothing::

    # celery.py
    from cluster_singletons.worker import install
    install(app)

    $ celery -A project worker --cluster
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps
from click import Option
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger("cluster_singletons.worker")

#: The worker's exit status when its runner stopped on an error (Celery's EX_FAILURE).
_EX_FAILURE = 1


class ClusterRunner(bootsteps.StartStopStep):
    """Starts after the pool (children are forked before the runner's threads exist)."""

    requires = ("celery.worker.components:Pool",)
    label = "cluster runner"

    def __init__(self, parent: Any, cluster: bool = False, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.enabled = bool(cluster)
        self.runner: Any = None

    def start(self, parent: Any) -> None:
        from cluster_singletons._installed import require_installed
        from cluster_singletons.conf import refuse_to_start

        try:  # Celery would log these with a traceback
            require_installed()
            from cluster_singletons.cluster.runner import Runner
            from cluster_singletons.singletons import driver, registry

            self.runner = Runner(
                driver.work(), kind="worker", placement_prefix=registry.LEASE_PREFIX
            )
        except ImproperlyConfigured as exc:
            raise refuse_to_start(exc, logger) from None
        self.runner.start()
        watch = threading.Thread(
            target=_stop_worker_on_error, args=(self.runner,), name="cluster-runner-watch"
        )
        watch.daemon = True
        watch.start()

    def stop(self, parent: Any) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner.join(self.runner.settings.shutdown_timeout + 5)
            self.runner = None

    shutdown = stop


def _stop_worker_on_error(runner: Any) -> None:
    """Wait for the runner's loop to end; if it ended on an error (the runner logged why),
    ask the worker for a warm shutdown with exit status 1, as its signal handlers do."""
    runner.join()
    if runner.error is not None:
        from celery.worker import state

        logger.error("cluster runner stopped; stopping the worker (exit status 1)")
        state.should_stop = _EX_FAILURE  # type: ignore[assignment]


def install(app: Celery) -> None:
    """Add the ``--cluster`` worker option and the bootstep to ``app``."""
    app.user_options["worker"].add(
        Option(
            ["--cluster"],
            is_flag=True,
            default=False,
            help="Host cluster singletons in this worker (cluster_singletons).",
        )
    )
    app.steps["worker"].add(ClusterRunner)
