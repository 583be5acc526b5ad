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
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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


TASK_KEYS_ACQUIRED = Counter(
    "cluster_task_keys_acquired_total",
    "Singleton task runs that took their key, by task.",
    ["task"],
)
TASK_KEYS_SKIPPED = Counter(
    "cluster_task_keys_skipped_total",
    "Singleton task runs that found their key held, by task and what they did "
    "(skip, retry, wait: waited in vain).",
    ["task", "policy"],
)
TASK_KEYS_LOST = Counter(
    "cluster_task_keys_lost_total",
    "Keys a running singleton task lost before it ended (its renewal found the term over).",
    ["task"],
)
TASK_KEY_HOLD_SECONDS = Histogram(
    "cluster_task_key_hold_duration_seconds",
    "How long a singleton task run held its key, by task.",
    ["task"],
)
