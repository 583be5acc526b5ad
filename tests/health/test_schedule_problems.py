"""A schedule the beat cannot run shows in every health surface: ``cluster_status``, the
ready probe, the admin dashboard and the scrape (a gauge read from the database, so the
web process that never ran the beat has the sample too)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from celery import Celery
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from cluster_singletons.beat import catalog
from cluster_singletons.health.report import cluster_health
from cluster_singletons.models import ScheduleRecord
from tests.beat.test_engine import T0, Leader

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _flag_two(app: Celery) -> None:
    """A leading beat meets a task name with a typo and a crontab that never fires."""
    app.conf.beat_schedule = {
        "ok": {"task": "t.tick", "schedule": 10},
        "typo": {"task": "t.tcik", "schedule": 10},
    }
    feb30 = CrontabSchedule.objects.create(
        minute="0", hour="0", day_of_month="30", month_of_year="2"
    )
    PeriodicTask.objects.create(name="feb30", task="t.tick", crontab=feb30)
    PeriodicTask.objects.update(date_changed=T0)
    # A schedule no source defines any more is not a problem of the cluster's.
    ScheduleRecord.objects.create(key="beat:retired", problem=catalog.DELETED)
    Leader(app).at(10)


def test_bad_schedules_turn_the_report_unhealthy_with_their_problem(app: Celery) -> None:
    _flag_two(app)
    report = cluster_health()
    flagged = {i.name: i for i in report.items if i.kind == "schedule"}
    assert set(flagged) == {"beat:typo", "periodic:feb30"}
    assert flagged["beat:typo"].status == "invalid"
    assert flagged["beat:typo"].last_error == "unknown task 't.tcik'"
    assert flagged["beat:typo"].problem == "unknown_task"
    assert flagged["periodic:feb30"].problem == "invalid"
    assert not report.healthy
    assert report.schedule_problems == {"unknown_task": 1, "invalid": 1}


def test_cluster_status_and_the_ready_probe_show_bad_schedules(app: Celery) -> None:
    _flag_two(app)
    with pytest.raises(SystemExit) as stopped:
        call_command("cluster_status", stdout=(out := StringIO()))
    assert stopped.value.code == 1
    line = next(row for row in out.getvalue().splitlines() if row.startswith("beat:typo"))
    assert "invalid" in line and "unknown task 't.tcik'" in line
    staff = Client()
    staff.force_login(User.objects.create_user("ops", is_staff=True))
    ready = staff.get("/cluster/health/ready")
    assert ready.status_code == 503
    checks = {c["name"]: c for c in ready.json()["checks"]}
    assert checks["periodic:feb30"]["status"] == "invalid"
    assert "beat:retired" not in checks
    with pytest.raises(SystemExit):
        call_command("cluster_status", "--json", stdout=(out := StringIO()))
    assert json.loads(out.getvalue())["schedule_problems"] == {"unknown_task": 1, "invalid": 1}


def test_the_dashboard_and_the_scrape_show_bad_schedules(app: Celery) -> None:
    _flag_two(app)
    scraped = Client().get("/cluster/metrics").content.decode()
    assert 'cluster_beat_schedule_problems{kind="unknown_task"} 1.0' in scraped
    assert 'cluster_beat_schedule_problems{kind="invalid"} 1.0' in scraped
    assert 'cluster_beat_schedule_problems{kind="unplannable"} 0.0' in scraped
    assert "cluster_healthy 0.0" in scraped
    staff = Client()
    staff.force_login(User.objects.create_superuser("admin", password="x"))
    page = staff.get("/admin/cluster_singletons/clusterhealth/").content.decode()
    assert 'data-name="beat:typo"' in page and "unknown task" in page
    assert 'data-name="periodic:feb30"' in page
