"""``python manage.py singleton_reset NAME [--yes]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons import control
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "Delete singleton NAME's state so its next load gives the model's defaults (also "
        "lifts a quarantine). The old value is kept in the state history. Asks for "
        "confirmation unless --yes. Unknown names exit 2."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The singleton's name.")
        parser.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        parser.add_argument("--note", default="", help="Why, kept with the history row.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        row = control.state_row(name)
        if row is None:
            self.stdout.write(f"singleton {name!r} has no stored state; nothing to reset")
            return
        if not options["yes"]:
            try:
                answer = input(f"Reset the state of {name!r} (version {row.version})? [y/N] ")
            except EOFError as exc:
                raise ValueError("no terminal to confirm on; pass --yes to reset") from exc
            if answer.strip().lower() not in ("y", "yes"):
                self.stdout.write("aborted; nothing changed")
                raise SystemExit(1)
        control.reset_state(name, options["note"])
        self.stdout.write(f"reset {name!r}; the old value (version {row.version}) is in history")
