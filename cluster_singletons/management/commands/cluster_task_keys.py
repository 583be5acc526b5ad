"""``python manage.py cluster_task_keys list [--json] | release LEASE [--yes]``."""

from __future__ import annotations

import getpass
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cluster_singletons.management.base import clear_errors
from cluster_singletons.tasks import operations


class Command(BaseCommand):
    help = (
        "List the singleton task keys held now (lease, epoch, holder host:pid, since, task "
        "id), or force-release one so its next run may start (the run in its body is not "
        "stopped; its fenced writes are refused). Release asks for confirmation unless "
        "--yes, is logged, and exits 1 if the key is not held."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["list", "release"])
        parser.add_argument("lease", nargs="?", help="release: the key's lease, as listed.")
        parser.add_argument("--json", action="store_true", help="list: one JSON list.")
        parser.add_argument("--yes", action="store_true", help="release: do not ask.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "list":
            self._list(as_json=options["json"])
        elif not options["lease"]:
            raise CommandError("release needs the key's lease name", returncode=2)
        else:
            self._release(options["lease"], yes=options["yes"])

    def _list(self, *, as_json: bool) -> None:
        keys = operations.held_keys()
        if as_json:
            rows = [
                {
                    **key.__dict__,
                    "since": key.since.isoformat(),
                    "expires_at": key.expires_at.isoformat(),
                }
                for key in keys
            ]
            self.stdout.write(json.dumps(rows))
            return
        if not keys:
            self.stdout.write("no task key is held")
        for key in keys:
            self.stdout.write(
                f"{key.lease}  epoch {key.epoch}  {key.host}:{key.pid} (runner {key.holder})  "
                f"since {key.since.isoformat()}  task {key.task_id or '-'}"
            )

    def _release(self, lease: str, *, yes: bool) -> None:
        key = operations.find(lease)
        if key is None:
            raise ValueError(f"task key {lease!r} is not held; nothing to release")
        if not yes:
            try:
                answer = input(
                    f"Force-release {lease} (epoch {key.epoch}, held by {key.host}:{key.pid})? "
                    "Its next run may start while this one is still in its body. [y/N] "
                )
            except EOFError as exc:
                raise ValueError("no terminal to confirm on; pass --yes to release") from exc
            if answer.strip().lower() not in ("y", "yes"):
                self.stdout.write("aborted; nothing changed")
                raise SystemExit(1)
        if not operations.force_release(key, who=f"{_user()} (cluster_task_keys)"):
            raise ValueError(f"task key {lease!r} changed hands meanwhile; nothing released")
        self.stdout.write(f"released {lease} (epoch {key.epoch})")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        return "an operator"
