"""``python manage.py cron_preview EXPR|NAME -n 10 --tz ZONE``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons import control
from cluster_singletons.beat.timetables import zone
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "Show the next run times of a cron expression ('*/5 * * * *') or of a schedule "
        "(its name or key, e.g. 'periodic:cleanup'), with a human-readable description. "
        "--list shows every schedule the beat knows."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("spec", nargs="?", help="A 5-field cron expression or a schedule name.")
        parser.add_argument("-n", type=int, default=10, help="How many run times (default 10).")
        parser.add_argument(
            "--tz", default=None, help="Show (and, for an expression, evaluate) in this zone."
        )
        parser.add_argument("--list", action="store_true", help="List every schedule and exit.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        if options["list"]:
            for key, schedule in sorted(control.schedules().items()):
                what = schedule.timetable.describe() if schedule.timetable else schedule.problem
                self.stdout.write(f"{key}\t{schedule.task or 'in-runner'}\t{what}")
            return
        if not options["spec"]:
            raise ValueError("give a cron expression or a schedule name (or --list)")
        if options["n"] < 1:
            raise ValueError("-n must be at least 1")
        label, timetable = control.timetable_of(options["spec"], options["tz"])
        # One rule: times in --tz if given, else in the schedule's own zone (a crontab's).
        shown = zone(options["tz"]) if options["tz"] else getattr(timetable, "tz", None)
        self.stdout.write(f"{label}: {timetable.describe()}")
        for tick in control.upcoming(options["spec"], options["n"], tz=options["tz"]):
            self.stdout.write((tick.astimezone(shown) if shown else tick).isoformat())
