"""Each runner is shown live, stopping or gone, with how long ago the database last saw
it: in the report, ``cluster_status`` and the dashboard, after a real SIGKILL too."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from cluster_singletons.cluster import fencing, membership
from cluster_singletons.health.report import cluster_health
from cluster_singletons.models import Runner
from project.demo.localcluster import Cluster, poll

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

FAST = {"lease_ttl": 2.0, "renew_interval": 0.5, "acquire_interval": 0.1}


def _status_text(*args: str) -> str:
    out = StringIO()
    with contextlib.suppress(SystemExit):  # unhealthy or not, the report is printed
        call_command("cluster_status", *args, stdout=out)
    return out.getvalue()


def _line(text: str, runner_id: int) -> str:
    return next(r for r in text.splitlines() if re.match(rf"\s+{runner_id} ", r))


def test_runners_are_live_stopping_or_gone_by_the_database_clock() -> None:
    live, stopping, gone = (
        membership.register(host=h, pid=1, kind="runcluster", using="default")
        for h in ("live", "stopping", "gone")
    )
    membership.mark_stopping(stopping, using="default")
    now = fencing.database_now("default")
    Runner.objects.filter(pk=gone).update(last_seen=now - timedelta(seconds=60))
    report = cluster_health(now=now + timedelta(seconds=1))
    states = {r.id: (r.state, r.seen_ago) for r in report.runner_list}
    assert states[live][0] == "live" and states[stopping][0] == "stopping"
    assert states[gone] == ("gone", pytest.approx(61, abs=0.5))
    assert (report.runners, report.runners_healthy, report.runners_gone) == (2, 1, 1)
    body = json.loads(_status_text("--json"))
    assert {r["id"]: r["state"] for r in body["runners"]} == {
        live: "live",
        stopping: "stopping",
        gone: "gone",
    }
    text = _status_text()
    assert "runners: 1 live, 1 stopping, 1 gone" in text
    assert re.search(r"gone +seen 6\d\.\d s ago", _line(text, gone)), text


@pytest.mark.multiprocess
def test_a_sigkilled_runner_is_shown_gone_and_not_counted_live(
    cluster_factory: type[Cluster], settings: Any
) -> None:
    settings.CLUSTER_SINGLETONS = FAST
    cluster = cluster_factory(FAST)
    killed, kept = cluster.start(2)
    ids = dict(Runner.objects.values_list("pid", "id"))
    os.kill(killed.pid, signal.SIGKILL)
    killed.process.wait(timeout=10)

    def shown_gone() -> str | None:
        text = _status_text()
        return text if " gone " in _line(text, ids[killed.pid]) else None

    text = poll("cluster_status to show the killed runner gone", shown_gone, timeout=20)
    assert "runners: 1 live, 0 stopping, 1 gone" in text, text
    assert re.search(r" live +seen \d+\.\d s ago", _line(text, ids[kept.pid])), text
    staff = Client()
    staff.force_login(User.objects.create_superuser("admin", password="x"))
    page = staff.get("/admin/cluster_singletons/clusterhealth/").content.decode()
    assert "1 live &middot; 0 stopping &middot; 1 gone runners" in page, page
    assert f'data-runner="{ids[killed.pid]}" data-state="gone"' in page
    assert f'data-runner="{ids[kept.pid]}" data-state="live"' in page


@pytest.mark.multiprocess
@pytest.mark.postgres
def test_on_postgres_a_sigkilled_runner_is_gone_long_before_its_ttl(
    cluster_factory: type[Cluster], settings: Any
) -> None:
    long = {"lease_ttl": 30.0, "renew_interval": 5.0, "acquire_interval": 0.1}
    settings.CLUSTER_SINGLETONS = long
    cluster = cluster_factory(long)
    (node,) = cluster.start(1)
    runner = Runner.objects.get(pid=node.pid)
    poll("its liveness session", lambda: Runner.objects.get(pk=runner.pk).liveness_lock, timeout=20)
    sent = time.monotonic()
    os.kill(node.pid, signal.SIGKILL)
    node.process.wait(timeout=10)
    poll(
        "the killed runner shown gone",
        lambda: " gone " in _line(_status_text(), runner.pk),
        timeout=long["lease_ttl"] / 2,
    )
    assert time.monotonic() - sent < long["lease_ttl"] / 2
