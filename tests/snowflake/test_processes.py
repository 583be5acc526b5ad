"""Snowflake ids from real processes and forked children at once, on the test database.

Run as a module, this file is the worker those tests start:
``python -m tests.snowflake.test_processes generate|lease OUT_DIR ...``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from array import array
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.django_db(transaction=True)]

WORKERS = 3  # each forks one child: six generators at once
SINGLE, BATCH = 250_000, 250_000  # ids per generator: 3,000,000 in all


ROOT = Path(__file__).resolve().parents[2]


def _start(mode: str, out: Path, *args: object) -> subprocess.Popen[bytes]:
    # Imported here: as a worker this module runs before django.setup().
    from project.demo.localcluster import database_url

    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "tests.snowflake.test_processes", mode, str(out), *map(str, args)]
    with (out / f"worker-{uuid.uuid4().hex[:8]}.log").open("wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _logs(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.glob("worker-*.log")))


def _go(out: Path, ready: int, processes: list[subprocess.Popen[bytes]]) -> None:
    from project.demo.localcluster import poll

    try:
        poll(
            f"{ready} workers ready",
            lambda: len(list(out.glob("ready-*"))) >= ready or any(p.poll() for p in processes),
            timeout=60,
        )
        (out / "go").touch()
        for process in processes:
            assert process.wait(timeout=120) == 0, _logs(out)
    except BaseException:
        _kill_workers(out, processes)
        raise


def _kill_workers(out: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """Leave no worker behind, forked children included (they wrote ready-PID)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for ready in out.glob("ready-*"):
        pid = int(ready.name.removeprefix("ready-"))
        with contextlib.suppress(OSError):  # gone, or its PID now belongs to another program
            if str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)


def test_processes_and_forked_children_issue_millions_of_ids_without_a_duplicate(
    tmp_path: Path,
) -> None:
    from cluster_singletons.models import MachineId
    from cluster_singletons.snowflake.value import Snowflake

    processes = [_start("generate", tmp_path, SINGLE, BATCH) for _ in range(WORKERS)]
    _go(tmp_path, 2 * WORKERS, processes)
    outputs = sorted(tmp_path.glob("*.ids"))
    assert len(outputs) == 2 * WORKERS, _logs(tmp_path)
    machines, total, seen = set(), 0, set()
    for path in outputs:
        ids = array("q")
        ids.frombytes(path.read_bytes())
        assert len(ids) == SINGLE + BATCH
        assert all(a < b for a, b in itertools.pairwise(ids)), f"{path.name} not increasing"
        mine = {Snowflake(ids[0]).machine_id, Snowflake(ids[-1]).machine_id}
        assert len(mine) == 1, f"{path.name} changed machine id"
        machines |= mine
        total += len(ids)
        seen.update(ids)
    assert total == 2 * WORKERS * (SINGLE + BATCH) and len(seen) == total
    assert len(machines) == 2 * WORKERS  # children never reuse their parent's machine id
    assert not MachineId.objects.exclude(holder=None).exists()  # all released at exit


def test_parallel_processes_lease_distinct_machine_ids(tmp_path: Path) -> None:
    from cluster_singletons.models import MachineId

    processes = [_start("lease", tmp_path, 30) for _ in range(4)]
    _go(tmp_path, 4, processes)
    leased = [int(x) for p in tmp_path.glob("*.leased") for x in p.read_text().split()]
    assert len(leased) == 120 and len(set(leased)) == 120, _logs(tmp_path)
    holders = dict(MachineId.objects.filter(pk__in=leased).values_list("pk", "holder"))
    assert len(holders) == 120 and len(set(holders.values())) == 120


# -- the worker ----------------------------------------------------------------------------


def _wait_for_go(out: Path) -> None:
    (out / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while not (out / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.001)


def _generate(out: Path, single: int, batch: int) -> int:
    from django.db import connection

    from cluster_singletons.snowflake import generate_id, generate_ids

    generate_id()  # lease the parent's machine id before forking
    with connection.cursor() as cursor:  # a session of this thread, inherited by the child
        pg = connection.vendor == "postgresql"
        cursor.execute("SELECT pg_backend_pid()" if pg else "SELECT 1")
        session = cursor.fetchone()
    child = os.fork()
    _wait_for_go(out)
    ids = array("q", [generate_id() for _ in range(single)])
    ids.extend(generate_ids(batch))
    (out / f"{os.getpid()}.ids").write_bytes(ids.tobytes())
    if child == 0:
        return 0  # a normal exit: atexit releases the child's machine id
    _, status = os.waitpid(child, 0)
    with connection.cursor() as cursor:  # the child's exit left this session alone
        cursor.execute("SELECT pg_backend_pid()" if pg else "SELECT 1")
        assert cursor.fetchone() == session
    return os.waitstatus_to_exitcode(status)


def _lease(out: Path, count: int) -> int:
    from cluster_singletons.snowflake import machine_ids

    _wait_for_go(out)
    machine_ids.ensure(using="default")
    leased = []
    for _ in range(count):
        now_ms = time.time_ns() // 1_000_000
        got = machine_ids.acquire(
            holder=uuid.uuid4().hex,
            host="worker",
            pid=os.getpid(),
            ttl=60.0,
            now_ms=now_ms,
            max_behind_ms=1000,
            reserve_until_ms=now_ms + 50_000,
            using="default",
        )
        assert got is not None
        leased.append(got.machine_id)
    (out / f"{os.getpid()}.leased").write_text(" ".join(map(str, leased)))
    return 0


if __name__ == "__main__":
    import django

    django.setup()
    mode, directory, *numbers = sys.argv[1:]
    if mode == "generate":
        sys.exit(_generate(Path(directory), int(numbers[0]), int(numbers[1])))
    sys.exit(_lease(Path(directory), int(numbers[0])))
