"""Prometheus metrics (prometheus-client), named by Prometheus conventions.

Two kinds:

- **Process metrics**, updated where things happen (executions, errors, leader changes,
  dispatches). Under Celery prefork or gunicorn, set ``PROMETHEUS_MULTIPROC_DIR`` and the
  ``/metrics`` view aggregates every process's files. Gauge modes are chosen on purpose:
  the last-execution timestamp keeps the ``max`` over processes (the newest execution
  anywhere on the host), the leading flag the ``liveall`` sum per live process.
- **Cluster metrics**, read from the database when scraped (``health.collector``): runners,
  healthy runners, singletons led, pending intents and deliveries, heartbeat ages. They are
  the same whichever process serves the scrape, so they are never multiplied by processes.

``serve`` (the ``metrics_port`` setting) serves the process metrics from a runner process
itself (the beat, ``runcluster``, a ``--cluster`` worker) with prometheus-client's own
server; the cluster metrics come from the web's ``/metrics`` view.
"""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import start_http_server as _start_http_server

EXECUTION_SECONDS = Histogram(
    "cluster_singleton_execution_duration_seconds",
    "Duration of one execution of a singleton function or @cron run.",
    ["singleton"],
)
EXECUTIONS = Counter(
    "cluster_singleton_executions_total",
    "Executions of a singleton function or @cron run that completed.",
    ["singleton"],
)
ERRORS = Counter(
    "cluster_singleton_errors_total",
    "Failed executions, by singleton and reason (SingletonError reason or exception type).",
    ["singleton", "reason"],
)
STATE_ERRORS = Counter(
    "cluster_singleton_state_errors_total",
    "State load/persist/decode failures, by singleton and reason.",
    ["singleton", "reason"],
)
LAST_EXECUTION = Gauge(
    "cluster_singleton_last_execution_timestamp_seconds",
    "Unix time of the last completed execution (or ctx.heartbeat()).",
    ["singleton"],
    multiprocess_mode="max",
)
LEADER_CHANGES = Counter(
    "cluster_leader_changes_total",
    "Leaderships this process took (a new epoch of a lease).",
    ["lease"],
)
LEADING = Gauge(
    "cluster_leading",
    "1 while this process leads the lease.",
    ["lease"],
    multiprocess_mode="liveall",
)
CLOCK_OFFSET = Gauge(
    "cluster_clock_offset_seconds",
    "The database's clock minus this process's wall clock, estimated at each renewal.",
    multiprocess_mode="liveall",
)
BEAT_STANDBY_WARM = Gauge(
    "cluster_beat_standby_warm",
    "1 while this process stands by for the beat with the schedules loaded and followed.",
    multiprocess_mode="liveall",
)
DISPATCH_LATENESS = Histogram(
    "cluster_beat_dispatch_lateness_seconds",
    "Publish time minus scheduled time of each dispatched tick.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TICKS_SKIPPED = Counter(
    "cluster_beat_ticks_skipped_total",
    "Ticks recorded as skipped by policy (catch-up horizon, overlap), by schedule.",
    ["schedule", "reason"],
)
TICKS_LATE = Counter(
    "cluster_beat_ticks_late_total",
    "Ticks dispatched more than a second after they were due, by schedule.",
    ["schedule"],
)
SCHEDULE_ERRORS = Counter(
    "cluster_beat_schedule_errors_total",
    "Schedules flagged as unable to run (bad expression, unknown task...).",
    ["schedule"],
)


#: Per-schedule series are kept for this many schedules per process; the rest share
#: ``_other`` (100,000 schedules must not become 100,000 series: the ledger has the detail).
SCHEDULE_LABELS = 200
_labelled: set[str] = set()


def schedule_label(key: str) -> str:
    if key in _labelled:
        return key
    if len(_labelled) < SCHEDULE_LABELS:
        _labelled.add(key)
        return key
    return "_other"


def process_registry() -> CollectorRegistry:
    """The process metrics to expose: under ``PROMETHEUS_MULTIPROC_DIR``, every process of
    the host aggregated; else this process's."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


_served: dict[tuple[str, int], object] = {}
_serving = threading.Lock()
logger = logging.getLogger("cluster_singletons.metrics")


def serve(port: int | None, address: str) -> None:
    """Serve ``process_registry()`` at ``http://address:port/metrics`` in a daemon thread,
    once per process (``None``: not at all). A port that cannot be bound is logged, never
    raised: the runner runs without it."""
    if port is None:
        return
    with _serving:
        if (address, port) in _served:
            return
        try:
            _served[(address, port)] = _start_http_server(
                port, addr=address, registry=process_registry()
            )
        except OSError as exc:
            logger.error("cannot serve metrics on %s:%s: %s", address, port, exc)
            return
    logger.info("serving this process's metrics on http://%s:%s/metrics", address, port)
