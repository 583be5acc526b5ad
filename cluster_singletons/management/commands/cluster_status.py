"""``python manage.py cluster_status [--json]``."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from cluster_singletons.cluster import leases
from cluster_singletons.conf import get_settings
from cluster_singletons.health.report import Report, RunnerStatus, cluster_health
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "Show the cluster: health of every singleton, @cron function and the beat (status, "
        "leader, epoch, heartbeat age, last error), schedules the beat cannot run, the runners "
        "(live, stopping or gone, when the database last saw each, their clocks' offsets to "
        "the database's) and the leases. Exits 0 when "
        "healthy, 1 when not. --json prints the same as the health endpoint's detail."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Machine-readable output.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        settings = get_settings()
        db = settings.database
        report = cluster_health()
        runners = report.runner_list
        held = leases.rows(using=db)
        if options["json"]:
            listed = [r.as_dict() for r in runners]
            body = {**report.as_dict(detail=True), "runners": listed, "leases": held}
            self.stdout.write(json.dumps(body, default=str, indent=2))
        else:
            self._table(report, runners, held, warn_above=settings.clock_offset_warning)
        if not report.healthy:
            raise SystemExit(1)

    def _table(
        self,
        report: Report,
        runners: list[RunnerStatus],
        leases: list[dict[str, Any]],
        *,
        warn_above: float,
    ) -> None:
        say = self.stdout.write
        say(f"cluster: {'healthy' if report.healthy else 'UNHEALTHY'}")
        say(f"{'NAME':32} {'STATUS':15} {'LEADER':>6} {'EPOCH':>6} {'AGE s':>8}  LAST ERROR")
        for item in report.items:
            age = f"{item.age:.1f}" if item.age is not None else "-"
            say(
                f"{item.name:32} {item.status:15} {item.leader or '-':>6} "
                f"{item.epoch or '-':>6} {age:>8}  {item.last_error[:60]}"
            )
        say(
            f"\nrunners: {report.runners_healthy} live, {report.runners_stopping} stopping, "
            f"{report.runners_gone} gone"
        )
        for r in runners:
            where = f"{r.host}:{r.pid}"
            say(
                f"  {r.id:>4} {r.kind:10} {where} {r.state:8} seen {r.seen_ago:.1f} s ago"
                f"{_clock(r.clock_offset, warn_above)}"
            )
            if r.crash_detection:
                say(f"       crash detected by {r.crash_detection}")
        say("\nleases:")
        for lease in leases:
            holder = lease["holder_id"] or "-"
            say(f"  {lease['name']:32} holder {holder:>4} epoch {lease['epoch']:>5}")


def _clock(offset: float | None, warn_above: float) -> str:
    """How far a runner's wall clock is from the database's, flagged above
    ``clock_offset_warning``."""
    if offset is None:
        return ", clock offset unknown"
    flag = " (above clock_offset_warning)" if abs(offset) > warn_above else ""
    return f", clock {offset:+.3f} s{flag}"
