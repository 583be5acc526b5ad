"""``metrics_port``: a runner process (here a real ``celery beat``) serves its own metrics,
aggregated over the host's processes under ``PROMETHEUS_MULTIPROC_DIR``."""

from __future__ import annotations

import logging
import socket
import urllib.request
from pathlib import Path

import pytest

from cluster_singletons import metrics
from project.demo.localcluster import Cluster, poll

FAST = {"lease_ttl": 2.0, "renew_interval": 0.5, "acquire_interval": 0.1}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_a_beat_process_serves_its_metrics_on_metrics_port(
    cluster_factory: type[Cluster], tmp_path: Path
) -> None:
    port = _free_port()
    folder = tmp_path / "prom"
    folder.mkdir()
    cluster = cluster_factory(
        {**FAST, "metrics_port": port}, env={"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    )
    (beat,) = cluster.start(1, beat=True)
    leading = f'cluster_leading{{lease="beat",pid="{beat.pid}"}} 1.0'
    text = poll(
        "the beat's own scrape", lambda: t if leading in (t := _scrape(port)) else None, timeout=30
    )
    assert 'cluster_leader_changes_total{lease="beat"} 1.0' in text
    assert "cluster_runners" not in text, "cluster metrics come from the web's /metrics"
    assert f"serving this process's metrics on http://127.0.0.1:{port}/metrics" in beat.text()


def test_a_port_taken_is_one_error_line_and_the_runner_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with caplog.at_level(logging.ERROR, logger="cluster_singletons.metrics"):
            metrics.serve(port, "127.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot serve metrics on 127.0.0.1:{port}: [Errno 98] Address already in use"
    ]
    metrics.serve(None, "127.0.0.1")  # not configured: nothing served
