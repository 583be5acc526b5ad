"""The leader-elected beat: ``celery -A project beat -S cluster_singletons.beat:LeaderScheduler``.

Safe to start on every node (and as ``celery worker -B --scheduler ...``; a worker's ``-S``
is ``--statedb``): each one is a runner
standing for the ``beat`` lease and for the singletons; the one leading ``beat`` runs the
engine (``engine.BeatEngine``), the others stand by with the schedules loaded
(``standby``).
``runcluster`` runs the same engine through ``cluster_work``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import Scheduler
from django.core.exceptions import ImproperlyConfigured

from cluster_singletons import names
from cluster_singletons.beat.standby import BeatWork
from cluster_singletons.cluster.leadership import LeaderWork
from cluster_singletons.cluster.runner import Runner
from cluster_singletons.conf import refuse_to_start
from cluster_singletons.singletons import driver, registry

logger = logging.getLogger("cluster_singletons.beat")

#: How often Celery's beat loop looks at the runner (the runner does the scheduling).
_TICK = 1.0
_RUNNER_KIND = "beat"


def beat_work(app: Any) -> LeaderWork:
    """Leader work for the ``beat`` lease: a fresh engine for every term, on the
    database's clock as the runner estimates it (a node whose wall clock is off still
    dispatches every tick on time), and a warm standby while another runner leads."""
    return BeatWork(app)


def cluster_work(app: Any) -> dict[str, LeaderWork]:
    """Everything a full node stands for: the beat and every registered singleton."""
    return {names.BEAT: beat_work(app), **driver.work()}


def start_runner(app: Any, kind: str) -> Runner:
    runner = Runner(cluster_work(app), kind=kind, placement_prefix=registry.LEASE_PREFIX)
    runner.start()
    return runner


class LeaderScheduler(Scheduler):
    """A Celery beat scheduler that only schedules while its process leads ``beat``.

    The entries Celery's own ``Scheduler`` would keep in memory are not used: schedules
    come from ``beat_schedule``, django-celery-beat's tables and ``@cron`` functions, and
    every tick goes through the run ledger.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.runner: Runner | None = None
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        if self.runner is None:
            try:
                self.runner = start_runner(self.app, _RUNNER_KIND)
            except ImproperlyConfigured as exc:
                raise refuse_to_start(exc, logger) from None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        runner = self.runner
        if runner is not None and runner.error is not None:
            logger.error("cluster runner stopped (%s); exiting", runner.error)
            raise SystemExit(1)
        return min(_TICK, float(self.max_interval or _TICK))

    def sync(self) -> None:
        """Nothing to sync: the ledger is written as ticks are dispatched."""

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.stop()
            runner.join(runner.settings.shutdown_timeout + 5)
            if runner.error is not None:  # Celery's beat exits 0 on the SystemExit of a tick
                raise SystemExit(1)

    @property
    def info(self) -> str:
        return "    . leader election: cluster_singletons (run this beat on every node)"
