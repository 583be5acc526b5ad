"""``python manage.py cluster_handoff NAME``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons import control
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "Ask the leader of singleton NAME (or 'beat') to hand off: at its next renewal it "
        "stops the work, runs on_lose_leadership and releases the lease; a standby takes "
        "over. Exits 1 if nobody leads it, 2 if the name is unknown."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="A singleton's name, or 'beat'.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        if not control.handoff(options["name"]):
            self.stderr.write(f"nobody leads {options['name']!r} now; nothing to hand off")
            raise SystemExit(1)
        self.stdout.write(f"handoff of {options['name']!r} requested")
