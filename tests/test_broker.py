"""The example project's Celery app on the configured broker, with a real worker process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from project.demo.localcluster import Cluster, poll
from project.demo.tasks import ping

pytestmark = [pytest.mark.broker, pytest.mark.multiprocess]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, {})
    yield cluster
    cluster.stop()


def test_a_worker_runs_a_task_sent_through_the_configured_broker(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    note = uuid.uuid4().hex
    ping.delay(note)
    poll("the worker to run demo.ping", lambda: f"ping {note}" in worker.text(), timeout=60)


@pytest.mark.django_db(transaction=True)
def test_scheduled_runs_reach_a_worker_which_reports_them_to_the_ledger(tmp_path: Path) -> None:
    """runcluster leads the beat, the worker runs the task with the cluster context and
    reports its end, so under the 'skip' overlap policy the next tick runs."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from cluster_singletons.models import Run

    cluster = Cluster(tmp_path, {"lease_ttl": 2.0, "renew_interval": 0.5, "overlap": "skip"})
    try:
        worker = cluster.start_worker()
        every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
        PeriodicTask.objects.create(name="ping", task="demo.ping", interval=every, args='["tick"]')
        cluster.start(1)

        def finished() -> bool:
            return Run.objects.filter(schedule="periodic:ping", status="succeeded").count() >= 3

        poll("three runs reported finished", finished, timeout=60)
        run = Run.objects.filter(status="succeeded").first()
        assert run is not None and run.finished_at is not None
        assert '"schedule": "periodic:ping"' in worker.text()
        assert f'"task_id": "{run.task_id}"' in worker.text(), "the task saw its context"
        assert PeriodicTask.objects.get(name="ping").total_run_count >= 3
    finally:
        cluster.stop()
