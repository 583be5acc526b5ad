"""Broker outage: intents stay pending while Redis is down and are published, each once,
when it returns. A Redis server of the test's own, stopped and restarted for real."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery

from cluster_singletons.models import Run
from project.demo.localcluster import poll, received
from tests.beat.test_engine import T0, Leader

pytestmark = [pytest.mark.multiprocess, pytest.mark.django_db(transaction=True)]


class RedisServer:
    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.folder), "--dbfilename", "dump.rdb", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        poll("redis to answer", self._answers, timeout=10)

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """Shut down keeping the data on disk, as a restarted production server would."""
        assert self.process is not None
        redis.Redis(port=self.port).shutdown(save=True)
        self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    started = RedisServer(tmp_path)
    started.start()
    yield started
    started.kill()


def test_intents_wait_out_a_broker_outage_and_are_published_once(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery prefers CELERY_BROKER_URL from the environment to an app's own broker.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("outage", broker=f"redis://127.0.0.1:{server.port}/0", set_as_current=False)
    app.conf.task_default_queue = "outage"
    app.conf.broker_connection_timeout = 1
    app.conf.beat_schedule = {"ten": {"task": "t.tick", "schedule": 10}}

    @app.task(name="t.tick", shared=False)
    def tick() -> None:
        """Only received here."""

    leader = Leader(app)
    leader.at(10)
    server.stop()  # the broker goes away
    leader.at(20)
    leader.at(30)
    assert Run.objects.filter(status=Run.Status.PENDING).count() == 2, "recorded, not lost"
    server.start()  # ... and comes back with what it held
    leader.at(45)  # past the publish retry delay: pending intents go out with the new tick
    ticks = sorted(h["cluster_context"]["tick"] for h in received(app, "outage"))
    assert ticks == [(T0 + timedelta(seconds=s)).isoformat() for s in (10, 20, 30, 40)]
    assert not Run.objects.filter(status=Run.Status.PENDING).exists()
