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
