"""Per-process probes: the probe file a runner writes from its loop, judged without Django
(``python -m cluster_singletons.cluster.probe``) or by ``manage.py cluster_probe``, for real
``runcluster`` and beat processes that run, hang, die and stop; never the cluster's health."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster_singletons.cluster.probe import ProbeFile, judge
from cluster_singletons.models import Runner, ScheduleRecord
from project.demo.localcluster import ROOT, Cluster, poll

FAST = {"lease_ttl": 2.0, "renew_interval": 0.5, "acquire_interval": 0.1}
_NO_DJANGO = """
import sys
from cluster_singletons.cluster import probe
code = probe.main(sys.argv[1:])
assert "django" not in sys.modules, "the exec probe imported Django"
sys.exit(code)
"""


def _said(**changes: Any) -> dict[str, Any]:
    now = 1_000.0
    said = {"runner": 7, "kind": "beat", "pid": 42, "lease_ttl": 10.0, "stopping": False}
    return {**said, "loop_at": now - 1, "renewed_at": now - 2, **changes}


@pytest.mark.unit
def test_live_needs_a_fresh_loop_and_ready_a_fresh_renewal_of_a_registration() -> None:
    now = 1_000.0
    assert judge("live", _said(), now).ok and judge("ready", _said(), now).ok
    assert not judge("live", _said(loop_at=now - 11), now).ok
    late = _said(renewed_at=now - 11)
    assert judge("live", late, now).ok, "a loop waiting for the database is alive"
    assert "last renewed 11.0 s ago" in judge("ready", late, now).text
    assert not judge("ready", late, now).ok
    assert judge("ready", _said(runner=None), now).text.endswith("not registered yet")
    assert not judge("ready", _said(stopping=True), now).ok


@pytest.mark.unit
def test_the_file_is_rewritten_at_most_once_a_second_unless_what_it_says_changes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "probe.json"
    probe = ProbeFile(path, kind="beat", lease_ttl=10, renew_interval=3)
    probe.touch(runner_id=None, renewed=None, now=5.0, stopping=False)
    first = json.loads(path.read_text())
    probe.touch(runner_id=None, renewed=None, now=5.1, stopping=False)
    assert json.loads(path.read_text()) == first
    probe.touch(runner_id=3, renewed=4.5, now=5.2, stopping=False)
    said = json.loads(path.read_text())
    assert (said["runner"], said["pid"]) == (3, os.getpid())
    assert said["renewed_at"] == pytest.approx(said["loop_at"] - 0.7)
    assert path.stat().st_mtime == pytest.approx(said["loop_at"], abs=0.5), "for `stat -c %Y`"
    probe.remove()
    assert not path.exists()
    broken = ProbeFile(tmp_path / "no" / "such" / "dir.json")
    broken.touch(runner_id=1, renewed=None, now=1.0, stopping=False)  # logged, not raised


def _exec_probe(check: str, path: Path) -> subprocess.CompletedProcess[str]:
    """What a Kubernetes exec probe runs: no Django, no settings, no database."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(
        [sys.executable, "-c", _NO_DJANGO, check, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _manage_probe(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "cluster_probe", *args],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _passes(run: subprocess.CompletedProcess[str]) -> bool:
    return run.returncode == 0


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_probes_follow_this_process_not_the_cluster(
    cluster_factory: type[Cluster], tmp_path: Path
) -> None:
    template = str(tmp_path / "probe-{kind}.json")
    cluster = cluster_factory({**FAST, "probe_file": template})
    (node,) = cluster.start(1)
    (beat,) = cluster.start(1, beat=True)
    files = {kind: tmp_path / f"probe-{kind}.json" for kind in ("runcluster", "beat")}
    poll(
        "both runners ready",
        lambda: all(_passes(_exec_probe("ready", f)) for f in files.values()),
        timeout=30,
    )
    # The cluster is unhealthy (a schedule cannot run); each process is fine all the same.
    ScheduleRecord.objects.create(key="beat:broken", problem="unknown task 'x'")
    status = subprocess.run(
        [sys.executable, "manage.py", "cluster_status"],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1, status.stdout
    for kind in files:
        done = _manage_probe(cluster, "ready", "--kind", kind)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("ready: runner ") and f"({kind}, pid " in done.stdout
    mixed = _manage_probe(cluster, "ready")
    assert mixed.returncode == 2 and "--kind" in mixed.stderr, "two kinds here: which one?"

    # A hung process (SIGSTOP) fails both probes; resumed, it passes again.
    os.kill(node.pid, signal.SIGSTOP)
    try:
        failed = poll(
            "the hung runner to fail live",
            lambda: (r := _exec_probe("live", files["runcluster"])).returncode == 1 and r,
            timeout=15,
        )
        assert "not live: runner" in failed.stderr and "its loop last passed" in failed.stderr
        assert _manage_probe(cluster, "ready", "--kind", "runcluster").returncode == 1
        assert _passes(_exec_probe("ready", files["beat"])), "the other process is unaffected"
    finally:
        os.kill(node.pid, signal.SIGCONT)
    poll(
        "the resumed runner ready",
        lambda: _passes(_exec_probe("ready", files["runcluster"])),
        timeout=30,
    )

    # A clean stop removes its file; a killed process's file goes stale.
    beat.process.send_signal(signal.SIGTERM)
    assert beat.process.wait(timeout=30) == 0
    gone = _exec_probe("live", files["beat"])
    assert gone.returncode == 1 and "no probe file" in gone.stderr
    os.kill(node.pid, signal.SIGKILL)
    node.process.wait(timeout=10)
    poll(
        "the killed runner to fail live",
        lambda: _exec_probe("live", files["runcluster"]).returncode == 1,
        timeout=15,
    )


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_a_runner_waiting_for_the_database_is_live_but_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "probe.json"
    settings = {"startup_timeout": 60, "retry_backoff": 0.2, "probe_file": str(path)}
    env = {
        **os.environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/unreachable",
        "CLUSTER_SINGLETONS_JSON": json.dumps(settings),
        "CLUSTER_VAR_DIR": str(tmp_path),
    }
    with (tmp_path / "node.log").open("wb") as log:
        node = subprocess.Popen(
            [sys.executable, "manage.py", "runcluster"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll("the probe file", path.exists, timeout=30)
        assert _passes(_exec_probe("live", path))
        as_documented = [
            sys.executable,
            "-m",
            "cluster_singletons.cluster.probe",
            "live",
            str(path),
        ]
        assert subprocess.run(as_documented, cwd=ROOT, timeout=30).returncode == 0
        ready = _exec_probe("ready", path)
        assert ready.returncode == 1 and "not registered yet" in ready.stderr
    finally:
        node.terminate()
        node.wait(timeout=30)


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_without_a_probe_file_the_probe_finds_this_hosts_registration(
    cluster_factory: type[Cluster],
) -> None:
    cluster = cluster_factory(FAST)
    node, _other = cluster.start(2)
    ambiguous = _manage_probe(cluster, "live")
    assert ambiguous.returncode == 2 and "pass --pid" in ambiguous.stderr
    done = _manage_probe(cluster, "ready", "--pid", str(node.pid))
    assert done.returncode == 0, done.stdout + done.stderr
    runner_id = Runner.objects.get(pid=node.pid).id
    assert f"ready: runner {runner_id} (runcluster, pid {node.pid}) is live" in done.stdout
    os.kill(node.pid, signal.SIGKILL)
    node.process.wait(timeout=10)
    poll(
        "the killed runner to fail ready",
        lambda: _manage_probe(cluster, "ready", "--pid", str(node.pid)).returncode == 1,
        timeout=20,
    )


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_a_cluster_worker_writes_its_probe_file_and_removes_it_on_warm_shutdown(
    cluster_factory: type[Cluster], tmp_path: Path
) -> None:
    cluster = cluster_factory({**FAST, "probe_file": str(tmp_path / "probe-{kind}.json")})
    worker = cluster.start_worker("--cluster")
    path = tmp_path / "probe-worker.json"
    poll("the worker's runner ready", lambda: _passes(_exec_probe("ready", path)), timeout=30)
    assert json.loads(path.read_text())["pid"] == worker.pid
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0
    assert not path.exists()


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_a_runner_handing_off_after_sigterm_is_not_ready(
    cluster_factory: type[Cluster], tmp_path: Path
) -> None:
    path = tmp_path / "probe.json"
    settings = {**FAST, "probe_file": str(path), "shutdown_timeout": 20}
    # Leader work that ignores the stop keeps the runner in its handoff for shutdown_timeout.
    cluster = cluster_factory(settings, lead=["probe=project.demo.work:stubborn_probe"])
    (node,) = cluster.start(1)
    cluster.wait_for_leader("probe")
    poll("ready", lambda: _passes(_exec_probe("ready", path)), timeout=30)
    node.process.send_signal(signal.SIGTERM)
    stopping = poll(
        "not ready while it hands off",
        lambda: (r := _exec_probe("ready", path)).returncode == 1 and r,
        timeout=10,
    )
    assert stopping.stderr.strip().endswith(": stopping"), stopping.stderr
