"""A local cluster of real ``runcluster`` processes sharing this process's database.

Used by the demo command and the multi-process tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from django.db import connection
from django.db.models.functions import Now

from cluster_singletons.models import Lease, Runner

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def poll(what: str, probe: Callable[[], T | None], *, timeout: float, every: float = 0.02) -> T:
    """Return the first truthy ``probe()`` result; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def database_url(*, port: int | None = None) -> str:
    """The URL of the database this test process uses (the test database); with ``port``,
    through the pooler or proxy listening there on 127.0.0.1."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(db['NAME']).resolve()}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    where = f"127.0.0.1:{port}" if port else f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    return f"postgres://{auth}@{where}/{db['NAME']}"


@dataclass
class Node:
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass(frozen=True)
class Leader:
    runner_id: int
    epoch: int
    pid: int


class Cluster:
    """Starts nodes, reads who leads from the database, and stops every process it started."""

    def __init__(
        self,
        tmp: Path,
        settings: dict[str, Any],
        lead: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "CLUSTER_SINGLETONS_JSON": json.dumps(settings),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.lead = lead or []
        self.nodes: list[Node] = []

    def start(
        self, count: int = 1, *, beat: bool = False, wrapper: Sequence[str] = ()
    ) -> list[Node]:
        """Start ``count`` runners: ``runcluster`` nodes, or with ``beat`` Celery beats
        using the leader scheduler; returns once they registered. ``wrapper``: interpreter
        arguments before the program's (``-m tests.skewed_clock 30``: its clock is off)."""
        started = []
        for _ in range(count):
            log = self.tmp / f"node{len(self.nodes)}.log"
            args = [sys.executable, *wrapper, "manage.py", "runcluster"]
            if beat:
                args = [sys.executable, *wrapper, "-m", "celery", "-A", "project", "beat"]
                args += ["--loglevel"]
                args += ["INFO", "-S", "cluster_singletons.beat:LeaderScheduler"]
                args += ["--schedule", str(self.tmp / f"beat{len(self.nodes)}")]
            for spec in self.lead:
                args += ["--lead", spec]
            started.append(self._spawn(args, log))
        pids = {node.pid for node in started}
        poll(
            f"{count} runner(s) to register",
            lambda: Runner.objects.filter(pid__in=pids).count() == len(pids),
            timeout=60,
        )
        return started

    def start_celery_beat(self, scheduler: str) -> Node:
        """A plain ``celery beat`` with another scheduler class (django-celery-beat's
        ``DatabaseScheduler``, say): it registers no runner; returns once it started."""
        log = self.tmp / f"celerybeat{len(self.nodes)}.log"
        args = [sys.executable, "-m", "celery", "-A", "project", "beat", "--loglevel", "INFO"]
        args += ["-S", scheduler, "--schedule", str(self.tmp / f"beat{len(self.nodes)}")]
        node = self._spawn(args, log)
        poll("celery beat to start", lambda: "beat: Starting..." in node.text(), timeout=60)
        return node

    def start_worker(self, *extra: str) -> Node:
        """A Celery worker of the example project on the configured broker, once ready.

        It purges the queue first: messages left by earlier runs are not this cluster's.
        """
        log = self.tmp / f"worker{len(self.nodes)}.log"
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--purge",
            *extra,
        ]
        node = self._spawn(args, log)
        poll("the worker to be ready", lambda: " ready." in node.text(), timeout=60)
        return node

    def _spawn(self, args: list[str], log: Path) -> Node:
        with log.open("wb") as out:
            process = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        node = Node(process, log)
        self.nodes.append(node)
        return node

    def leader(self, lease: str = "beat") -> Leader | None:
        row = Lease.objects.select_related("holder").filter(name=lease).first()
        if row is None or row.holder is None:
            return None
        return Leader(row.holder_id or 0, row.epoch, row.holder.pid)

    def wait_for_leader(
        self, lease: str = "beat", *, other_than: Leader | None = None, timeout: float = 60
    ) -> Leader:
        def probe() -> Leader | None:
            found = self.leader(lease)
            if found and other_than and found.runner_id == other_than.runner_id:
                return None
            return found

        return poll(f"a leader of {lease!r}", probe, timeout=timeout, every=0.01)

    def holders(self, prefix: str) -> dict[int, int]:
        """Runner id -> number of unexpired leases named ``prefix…`` it holds."""
        rows = Lease.objects.filter(
            name__startswith=prefix, holder__isnull=False, expires_at__gt=Now()
        ).values_list("holder_id", flat=True)
        counts: dict[int, int] = {}
        for holder in rows:
            counts[holder] = counts.get(holder, 0) + 1
        return counts

    def node(self, pid: int) -> Node:
        return next(node for node in self.nodes if node.pid == pid)

    def signal(self, pid: int, signum: signal.Signals) -> float:
        """Send ``signum`` and return the monotonic time it was sent."""
        sent = time.monotonic()
        os.kill(pid, signum)
        return sent

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                os.kill(node.pid, signal.SIGCONT)
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.log.name} (pid {node.pid})\n{node.text()}" for node in self.nodes
        )


def received(app: Any, queue: str, *, wait: float = 0.0) -> list[dict[str, Any]]:
    """The headers of every message in ``queue``, consumed: what the broker really holds.
    ``wait``: how long to wait for each further message (0: take what is there)."""
    got = []
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(block=wait > 0, timeout=wait or None)
            except simple.Empty:
                break
            got.append(message.headers)
            message.ack()
        simple.close()
    return got
