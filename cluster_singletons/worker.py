"""Celery worker bootstep: let a worker node host singletons (opt-in).

``install(app)`` adds a ``--cluster`` worker option. A worker started with it runs a
runner in its main process, standing for every singleton (not the beat lease), spread
with the other runners; warm shutdown hands its singletons off. Without the option the
step does nothing::

    # celery.py
    from cluster_singletons.worker import install
    install(app)

    $ celery -A project worker --cluster
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps
from click import Option


class ClusterRunner(bootsteps.StartStopStep):
    """Starts after the pool (children are forked before the runner's threads exist)."""

    requires = ("celery.worker.components:Pool",)
    label = "cluster runner"

    def __init__(self, parent: Any, cluster: bool = False, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.enabled = bool(cluster)
        self.runner: Any = None

    def start(self, parent: Any) -> None:
        from cluster_singletons.cluster.runner import Runner
        from cluster_singletons.singletons import driver, registry

        self.runner = Runner(driver.work(), kind="worker", placement_prefix=registry.LEASE_PREFIX)
        self.runner.start()

    def stop(self, parent: Any) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner.join(self.runner.settings.shutdown_timeout + 5)
            self.runner = None

    shutdown = stop


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
