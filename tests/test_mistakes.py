"""The usual mistakes of a new project get one clear line from every host, and a
non-zero exit: real ``runcluster``, ``celery beat`` and ``celery worker --cluster``
processes on a database nobody migrated."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

from project.demo.localcluster import ROOT

pytestmark = pytest.mark.multiprocess

_BEAT = ["-m", "celery", "-A", "project", "beat", "-S", "cluster_singletons.beat:LeaderScheduler"]
_WORKER = ["-m", "celery", "-A", "project", "worker", "--cluster", "--without-mingle"]
HOSTS = {
    "runcluster": ["manage.py", "runcluster"],
    "beat": [*_BEAT, "--loglevel", "INFO"],
    "worker": [*_WORKER, "--without-gossip", "--pool", "solo", "--loglevel", "INFO"],
}


@pytest.fixture
def unmigrated(tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of the test's vendor: nobody ran ``migrate``."""
    if connection.vendor != "postgresql":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        return
    db = connection.settings_dict
    name = f"{db['NAME']}_unmigrated"
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{name}"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={
            **os.environ,
            "CLUSTER_VAR_DIR": str(tmp_path),
            "CELERY_BROKER_URL": "filesystem://",
            "PYTHONUNBUFFERED": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_unapplied_migrations_say_run_migrate_at_once_and_exit_1(
    host: str, unmigrated: str, tmp_path: Path
) -> None:
    # A startup_timeout far beyond the test's timeout: the hosts must not wait for it.
    done = _run(
        HOSTS[host],
        tmp_path,
        DATABASE_URL=unmigrated,
        CLUSTER_SINGLETONS_JSON='{"startup_timeout": 300}',
    )
    output = done.stdout + done.stderr
    assert done.returncode not in (0, None), output
    assert "run `python manage.py migrate`" in output, output
    assert "database unreachable" not in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_a_mistyped_setting_is_one_line_suggesting_the_key_and_never_its_value(
    host: str, tmp_path: Path
) -> None:
    bad = '{"lease_tll": 10, "helth_token": "s3cret-token"}'
    done = _run(HOSTS[host], tmp_path, CLUSTER_SINGLETONS_JSON=bad)
    output = done.stdout + done.stderr
    assert done.returncode not in (0, None), output
    assert output.count("lease_tll") == 1, output
    assert "'lease_tll'] is not a setting (did you mean 'lease_ttl'?)" in output, output
    assert "did you mean 'health_token'?" in output, output
    assert "s3cret" not in output, output
    assert "Traceback" not in output, output


_NOT_INSTALLED = "add 'cluster_singletons' to INSTALLED_APPS"


@pytest.mark.parametrize(
    "args",
    [["manage.py", "check"], HOSTS["beat"], HOSTS["worker"]],
    ids=["check", "beat", "worker"],
)
def test_the_app_missing_from_installed_apps_is_one_line_saying_what_to_add(
    args: list[str], tmp_path: Path
) -> None:
    done = _run(args, tmp_path, DJANGO_SETTINGS_MODULE="tests.settings_without_app")
    output = done.stdout + done.stderr
    assert done.returncode not in (0, None), output
    assert output.count(_NOT_INSTALLED) == 1, output
    assert "Traceback" not in output and "RuntimeError" not in output, output
