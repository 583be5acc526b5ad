"""``python manage.py cluster_probe live|ready``: this process's runner, for a pod's probes."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cluster_singletons.cluster import fencing, membership
from cluster_singletons.cluster.probe import CHECKS, Verdict, path_for, probe
from cluster_singletons.conf import get_settings
from cluster_singletons.health.report import runner_status
from cluster_singletons.health.status import LIVE, STOPPING

_KINDS = ("beat", "runcluster", "worker")


class Command(BaseCommand):
    help = (
        "Probe the runner of this pod or host, not the cluster: 'live' when its loop passes, "
        "'ready' when its registration is also renewed (and it is not stopping). Exits 0 or "
        "1 with one line; 2 on misuse. Reads the probe file (CLUSTER_SINGLETONS['probe_file'] "
        "or --file) without touching the database; without one, finds the registration of "
        "this host (and --pid) in the database."
    )
    # A probe runs every few seconds: no system checks, no database unless it must.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("check", choices=CHECKS)
        parser.add_argument("--file", help="The probe file (default: the probe_file setting).")
        parser.add_argument(
            "--kind", choices=_KINDS, help="The runner's kind, for a probe_file with {kind}."
        )
        parser.add_argument(
            "--pid", type=int, help="Without a probe file: the runner's process id on this host."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        check = options["check"]
        path = self._file(options["file"], options["kind"])
        verdict = probe(check, path) if path is not None else self._registered(check, options)
        (self.stdout if verdict.ok else self.stderr).write(verdict.text)
        if not verdict.ok:
            sys.exit(1)

    def _file(self, given: str | None, kind: str | None) -> Path | None:
        if given:
            return Path(given)
        template = get_settings().probe_file
        if not template or "{kind}" not in template or kind:
            return path_for(template, kind or "")
        found = [p for k in _KINDS if (p := path_for(template, k)) and p.exists()]
        if len(found) > 1:
            raise CommandError(
                f"probe files of several kinds here ({', '.join(map(str, found))}): pass --kind",
                returncode=2,
            )
        return found[0] if found else Path(template)

    def _registered(self, check: str, options: dict[str, Any]) -> Verdict:
        """No probe file: this host's registration, by the database's clock."""
        settings = get_settings()
        host, pid = socket.gethostname(), options["pid"]
        mine = [
            row
            for row in membership.rows(using=settings.database)
            if row.host == host and (row.pid == pid if pid else _alive(row.pid))
        ]
        if len(mine) > 1:
            pids = ", ".join(str(row.pid) for row in mine)
            raise CommandError(
                f"several runners are registered from {host} (pids {pids}): pass --pid or set "
                "CLUSTER_SINGLETONS['probe_file']",
                returncode=2,
            )
        if not mine:
            which = f"pid {pid}" if pid else "a process alive here"
            text = f"not {check}: no runner of {host} ({which}) is registered"
            return Verdict(ok=False, text=text)
        runner = runner_status(mine[0], fencing.database_now(settings.database), settings)
        state = runner.state
        ok = state == LIVE or (check == "live" and state == STOPPING)
        who = f"runner {runner.id} ({runner.kind}, pid {runner.pid})"
        said = check if ok else f"not {check}"
        return Verdict(ok=ok, text=f"{said}: {who} is {state}, seen {runner.seen_ago:.1f} s ago")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
