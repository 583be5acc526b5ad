"""``python manage.py cluster_schedule pause|resume|run NAME``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons import control
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "Operate one schedule: 'pause NAME --note WHY' (its ticks pass without runs), "
        "'resume NAME', 'run NAME' (a manual run, recorded in the ledger; the leading beat "
        "publishes it within a second)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["pause", "resume", "run"])
        parser.add_argument("name", help="Schedule name or key (see cron_preview --list).")
        parser.add_argument("--note", default="", help="Why (required to pause).")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        action, name, note = options["action"], options["name"], options["note"]
        if action == "pause":
            if not note:
                raise ValueError("say why with --note")
            control.pause(name, note)
            self.stdout.write(f"paused {name}: {note}")
        elif action == "resume":
            control.resume(name)
            self.stdout.write(f"resumed {name}")
        else:
            run = control.run_now(name, note=note)
            self.stdout.write(f"recorded manual run {run.task_id} of {run.schedule}")
