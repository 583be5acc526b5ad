"""Two deployments on one database, each a real ``celery beat`` under its own
``key_prefix``, leading the same django-celery-beat row: each dispatches every tick of it
under its own task ids (a second deployment dispatched none before)."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons.beat import ledger
from cluster_singletons.models import Run
from project.celery import app as project_app
from project.demo.localcluster import Cluster, poll, received
from tests.beat.test_processes import SETTINGS

pytestmark = [pytest.mark.multiprocess, pytest.mark.django_db(transaction=True)]

PREFIXES = ("east:", "west:")


def test_two_prefixed_beats_on_one_database_each_dispatch_every_tick(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    queue = f"deployments-{uuid.uuid4().hex[:8]}"
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="each-second", task="demo.ping", interval=every, queue=queue)
    clusters = []
    for prefix in PREFIXES:
        (tmp_path / prefix[:-1]).mkdir()
        cluster = Cluster(tmp_path / prefix[:-1], {**SETTINGS, "key_prefix": prefix})
        request.addfinalizer(cluster.stop)
        cluster.start(1, beat=True)
        cluster.wait_for_leader(lease=f"{prefix}beat")
        clusters.append(cluster)
    for prefix in PREFIXES:
        poll(
            f"{prefix} to dispatch",
            lambda p=prefix: Run.objects.filter(
                schedule__startswith=p, published_at__isnull=False
            ).exists(),
            timeout=30,
        )
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    end = start + timedelta(seconds=4)
    for prefix in PREFIXES:
        poll(
            f"{prefix} to publish through {end}",
            lambda p=prefix: Run.objects.filter(
                schedule=f"{p}periodic:each-second", tick__gte=end, published_at__isnull=False
            ).exists(),
            timeout=30,
        )
    for cluster in clusters:
        cluster.stop()
    by_id = Counter(m["id"] for m in received(project_app, queue, wait=1.0))
    logs = "".join(c.logs()[-3000:] for c in clusters)
    for prefix in PREFIXES:
        key = f"{prefix}periodic:each-second"
        ticks = [start + timedelta(seconds=i) for i in range(5)]
        covered = Counter[datetime]()
        for run in Run.objects.filter(schedule=key, tick__gte=start - timedelta(seconds=60)):
            first = run.first_tick or run.tick
            covered.update(first + timedelta(seconds=i) for i in range(run.ticks))
            if start <= run.tick <= end:
                assert run.task_id == ledger.task_id(key, run.tick)
                assert by_id[run.task_id] == 1, (prefix, run, logs)
        assert [covered[t] for t in ticks] == [1] * 5, (prefix, logs)
    assert "Traceback" not in logs, logs
