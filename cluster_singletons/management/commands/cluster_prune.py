"""``python manage.py cluster_prune --older-than 30d``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons import control
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "Delete run-ledger rows older than --older-than (30d, 12h, 90m, 3600s, 2w). "
        "Intents not yet published are kept. Backfills cannot see ticks pruned away."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", required=True, help="Age, e.g. 30d.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        deleted = control.prune(control.parse_duration(options["older_than"]))
        self.stdout.write(f"deleted {deleted} ledger row(s)")
