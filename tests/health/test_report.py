"""Health statuses with an injected clock, the probe and metrics endpoints, permissions."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from cluster_singletons.beat import crons
from cluster_singletons.cluster import heartbeats
from cluster_singletons.health.collector import ClusterCollector
from cluster_singletons.health.report import cluster_health
from cluster_singletons.health.status import FAILED, HEALTHY, NEVER, NOT_LED, STALE
from cluster_singletons.models import Heartbeat, Lease, Runner
from cluster_singletons.singletons import registry
from project.demo.localcluster import ROOT
from tests.tcpproxy import end_session

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def watched(isolated_registry: None) -> None:
    """Only our singleton is registered while the test runs."""
    registry.singleton("watched", interval=10)(lambda ctx: None)


def _lead(name: str, *, since: datetime) -> Runner:
    runner = Runner.objects.create(host="h", pid=1, kind="runcluster")
    Runner.objects.filter(pk=runner.pk).update(last_seen=NOW)
    Lease.objects.update_or_create(
        name=name,
        defaults={
            "holder": runner,
            "epoch": 3,
            "acquired_at": since,
            "expires_at": NOW + timedelta(hours=1),
        },
    )
    return runner


def _status(now: datetime = NOW) -> dict[str, str]:
    return {i.name: i.status for i in cluster_health(now=now).items}


def _beat(seconds_ago: float | None, failed_ago: float | None = None) -> None:
    Heartbeat.objects.update_or_create(
        name="singleton:watched",
        defaults={
            "expected_interval": 10,
            "beat_at": None if seconds_ago is None else NOW - timedelta(seconds=seconds_ago),
            "failed_at": None if failed_ago is None else NOW - timedelta(seconds=failed_ago),
            "last_error": "" if failed_ago is None else "ValueError: boom",
        },
    )


@pytest.mark.usefixtures("watched")
def test_statuses_follow_the_clock() -> None:
    assert _status() == {"singleton:watched": NOT_LED}
    _lead("singleton:watched", since=NOW - timedelta(seconds=5))
    assert _status() == {"singleton:watched": NEVER}, "within the grace period"
    assert _status(NOW + timedelta(seconds=31))["singleton:watched"] == STALE
    _beat(5)
    assert _status()["singleton:watched"] == HEALTHY
    assert _status(NOW + timedelta(seconds=14.9))["singleton:watched"] == HEALTHY
    assert _status(NOW + timedelta(seconds=40))["singleton:watched"] == STALE
    _beat(5, failed_ago=1)
    report = cluster_health(now=NOW)
    (item,) = report.items
    assert (item.status, item.last_error) == (FAILED, "ValueError: boom")
    assert not report.healthy
    _beat(0.5, failed_ago=1)
    assert _status()["singleton:watched"] == HEALTHY, "a later success clears it"


@pytest.mark.usefixtures("watched")
def test_a_recorded_execution_counts_and_stamps_database_time() -> None:
    runner = _lead("singleton:watched", since=datetime.now(UTC))
    heartbeats.record("singleton:watched", runner_id=runner.pk, epoch=3, interval=10)
    heartbeats.record("singleton:watched", runner_id=runner.pk, epoch=3, interval=10, error="E: x")
    row = Heartbeat.objects.get()
    assert (row.executions, row.failures, row.last_error) == (1, 1, "E: x")
    assert row.beat_at is not None and abs(row.beat_at - datetime.now(UTC)) < timedelta(minutes=1)


@pytest.mark.usefixtures("watched")
def test_ready_shows_detail_only_to_staff_or_the_token(settings: Any) -> None:
    settings.CLUSTER_SINGLETONS = {"health_token": "s3cret"}
    anonymous = Client().get("/cluster/health/ready")
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "unhealthy"}
    with_token = Client().get("/cluster/health/ready", HTTP_AUTHORIZATION="Bearer s3cret")
    assert with_token.json()["checks"][0]["status"] == NOT_LED
    assert (
        "checks"
        not in Client().get("/cluster/health/ready", HTTP_AUTHORIZATION="Bearer wrong").json()
    )
    staff = Client()
    staff.force_login(User.objects.create_user("ops", is_staff=True))
    assert "checks" in staff.get("/cluster/health/ready").json()
    assert Client().get("/cluster/health/live").json() == {"status": "ok"}
    assert Client().get("/cluster/metrics").status_code == 401
    scraped = Client().get("/cluster/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert b"cluster_runners " in scraped.content


def test_the_bearer_scheme_is_case_insensitive(settings: Any) -> None:
    settings.CLUSTER_SINGLETONS = {"health_token": "s3cret"}
    for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
        scraped = Client().get("/cluster/metrics", HTTP_AUTHORIZATION=header)
        assert scraped.status_code == 200, header
    for header in ("Bearer S3CRET", "Basic s3cret", "Bearers3cret", "bearer"):
        assert Client().get("/cluster/metrics", HTTP_AUTHORIZATION=header).status_code == 401


_DOWN = """
import django, json, os
django.setup()
from django.test import Client
response = Client().get("/cluster/health/ready")
print(response.status_code, json.dumps(response.json()))
print(Client().get("/cluster/health/live").status_code)
"""


@pytest.mark.postgres
def test_a_scrape_after_the_server_ended_the_session_is_answered_by_the_next() -> None:
    collector = ClusterCollector()  # a metrics server's thread calls it, not a request
    end_session()
    assert list(collector.collect()) == [], "no samples (and a log line) for this scrape"
    assert "cluster_runners" in {family.name for family in collector.collect()}


def test_ready_answers_503_when_the_database_is_down() -> None:
    """A real process whose database server refuses connections."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/nowhere",
    }
    out = subprocess.run(
        [sys.executable, "-c", _DOWN], cwd=ROOT, env=env, check=True, capture_output=True
    ).stdout.decode()
    assert out.splitlines() == ['503 {"status": "unavailable"}', "200"]


_CHILD = """
import django, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup()
from cluster_singletons import metrics
metrics.EXECUTIONS.labels("multi").inc()
metrics.LAST_EXECUTION.labels("multi").set({stamp})
"""


def test_metrics_aggregate_processes_in_multiprocess_mode(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    for stamp in (100, 200):
        subprocess.run(
            [sys.executable, "-c", _CHILD.format(stamp=stamp)], cwd=ROOT, env=env, check=True
        )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        text = Client().get("/cluster/metrics").content.decode()
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert 'cluster_singleton_executions_total{singleton="multi"} 2.0' in text
    assert 'cluster_singleton_last_execution_timestamp_seconds{singleton="multi"} 200.0' in text
    assert "cluster_runners_healthy" in text


@pytest.mark.usefixtures("isolated_registry")
def test_a_cron_function_is_stale_when_its_next_run_is_overdue() -> None:

    crons.cron("hourly", "0 * * * *")(lambda run: None)
    try:
        _lead("beat", since=NOW - timedelta(hours=3))
        Heartbeat.objects.create(
            name="cron:hourly", expected_interval=0, beat_at=NOW - timedelta(minutes=50)
        )
        statuses = {i.name: i.status for i in cluster_health(now=NOW).items}
        assert statuses["cron:hourly"] == HEALTHY, "ran at 11:10; 12:00 is due just now"
        later = NOW + timedelta(seconds=31)
        statuses = {i.name: i.status for i in cluster_health(now=later).items}
        assert statuses["cron:hourly"] == STALE, "12:00 is overdue by more than stale_grace"
    finally:
        crons._crons.pop("cron:hourly")


@pytest.mark.usefixtures("isolated_registry")
def test_a_nightly_cron_function_is_not_stale_before_its_first_run_is_due() -> None:
    crons.cron("nightly", "0 3 * * *")(lambda run: None)
    try:
        runner = _lead("beat", since=NOW - timedelta(minutes=5))  # the beat led from 11:55
        for later in (timedelta(seconds=31), timedelta(hours=15)):
            Runner.objects.filter(pk=runner.pk).update(last_seen=NOW + later)
            Lease.objects.update(expires_at=NOW + later + timedelta(seconds=10))
            Heartbeat.objects.update_or_create(  # the beat itself is making progress
                name="beat", defaults={"expected_interval": 5, "beat_at": NOW + later}
            )
            report = cluster_health(now=NOW + later)
            statuses = {i.name: i.status for i in report.items}
            assert statuses["cron:nightly"] == NEVER, later
            assert report.healthy, "a job not yet due keeps the cluster healthy"
        first_due = NOW.replace(hour=3) + timedelta(days=1)
        overdue = first_due + timedelta(seconds=31)
        Lease.objects.update(expires_at=overdue + timedelta(seconds=10))
        statuses = {i.name: i.status for i in cluster_health(now=overdue).items}
        assert statuses["cron:nightly"] == STALE, "03:00 passed without a run"
    finally:
        crons._crons.pop("cron:nightly")
