"""Cluster metrics for Prometheus, read from the database when scraped.

They are the same whichever process serves the scrape (the database holds the cluster),
so they are never multiplied by processes: runners, healthy runners, singletons led,
pending intents and deliveries, schedules the beat cannot run (by kind of problem),
heartbeat ages, each runner's clock offset. Process metrics are in ``metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.db import DatabaseError
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.conf import get_settings
from cluster_singletons.health.report import KINDS, cluster_health

logger = logging.getLogger("cluster_singletons.metrics")


class ClusterCollector(Collector):
    """Cluster figures read from the database at scrape time; a failed read yields no
    samples (and a log line) rather than an error page."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            report = cluster_health(detail=True)
        except DatabaseError as exc:
            # Scrapes may come from a long-lived thread of a metrics server, not a request.
            drop_if_unusable(get_settings().database)
            logger.warning("cluster metrics unavailable: %s", exc)
            return
        for name, value, text in (
            ("cluster_runners", report.runners, "Runners live or stopping (not gone)."),
            ("cluster_runners_healthy", report.runners_healthy, "Live runners not stopping."),
            (
                "cluster_runners_gone",
                report.runners_gone,
                "Registrations not seen within the lease TTL (or whose session ended).",
            ),
            ("cluster_singletons_led", report.led, "Singletons with a current leader."),
            ("cluster_beat_pending_intents", report.pending_intents, "Ledger intents unpublished."),
            (
                "cluster_pending_deliveries",
                report.pending_deliveries,
                "Delayed deliveries waiting.",
            ),
            ("cluster_healthy", int(report.healthy), "1 when every check passes."),
        ):
            yield GaugeMetricFamily(name, text, value=value)
        age = GaugeMetricFamily(
            "cluster_heartbeat_age_seconds",
            "Seconds since the last heartbeat (the beat: its last pass).",
            labels=["name", "status"],
        )
        for item in report.items:
            if item.age is not None:
                age.add_metric([item.name, item.status], item.age)
        yield age
        offsets = GaugeMetricFamily(
            "cluster_runner_clock_offset_seconds",
            "Each live runner's estimate of the database's clock minus its wall clock.",
            labels=["runner"],
        )
        for runner, offset in report.clock_offsets.items():
            offsets.add_metric([str(runner)], offset)
        yield offsets
        problems = GaugeMetricFamily(
            "cluster_beat_schedule_problems",
            "Schedules the beat flagged as unable to run, by kind of problem.",
            labels=["kind"],
        )
        for kind in KINDS:
            problems.add_metric([kind], report.schedule_problems.get(kind, 0))
        yield problems
