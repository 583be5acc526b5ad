"""``python manage.py runcluster``: run one cluster node until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import signal
import sys
from types import FrameType
from typing import Any

from celery import current_app
from django.core.management.base import BaseCommand, CommandError, CommandParser

from cluster_singletons.beat.scheduler import cluster_work
from cluster_singletons.cluster.leadership import LeaderWork
from cluster_singletons.cluster.runner import Runner
from cluster_singletons.singletons import registry


class Command(BaseCommand):
    help = (
        "Run a cluster node: register, lead what this node is elected for (the 'beat' lease and "
        "the singletons), stand by for the rest. SIGTERM or SIGINT hands leadership off and "
        "exits 0; exits 1 if the database stays unreachable for "
        "CLUSTER_SINGLETONS['startup_timeout']."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--lead",
            action="append",
            default=[],
            metavar="NAME=MODULE:FUNCTION",
            help="Also stand for lease NAME and, while leading it, run FUNCTION(leadership). "
            "Repeatable.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        work: dict[str, LeaderWork] = cluster_work(current_app)
        for spec in options["lead"]:
            name, fn = _parse_lead(spec)
            work[name] = fn
        runner = Runner(work, kind="runcluster", placement_prefix=registry.LEASE_PREFIX)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            runner.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        runner.start()
        while not runner.join(timeout=0.5):
            pass
        if runner.error is not None:
            sys.exit(1)


def _parse_lead(spec: str) -> tuple[str, LeaderWork]:
    name, sep, target = spec.partition("=")
    module_name, colon, attr = target.partition(":")
    if not (sep and colon and name and module_name and attr):
        raise CommandError(f"--lead {spec!r}: expected NAME=MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CommandError(f"--lead {spec!r}: cannot import {target}: {exc}") from exc
    if not callable(fn):
        raise CommandError(f"--lead {spec!r}: {target} is not callable")
    return name, fn
