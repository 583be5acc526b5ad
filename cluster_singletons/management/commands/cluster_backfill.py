"""``python manage.py cluster_backfill NAME --start ... --end ...``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons import control
from cluster_singletons.management.base import clear_errors, when


class Command(BaseCommand):
    help = (
        "Dispatch the ticks of schedule NAME between --start and --end (ISO 8601; naive "
        "means UTC) that never ran, each once: ticks already in the run ledger are left "
        "out, skipped ones are run. The leading beat publishes them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="Schedule name or key (see cron_preview --list).")
        parser.add_argument("--start", required=True, help="First instant, e.g. 2026-11-01T00:00")
        parser.add_argument("--end", required=True, help="Last instant, inclusive.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        recorded, left = control.backfill(
            options["name"], when(options["start"]), when(options["end"])
        )
        self.stdout.write(f"{recorded} tick(s) recorded for dispatch, {left} already ran")
