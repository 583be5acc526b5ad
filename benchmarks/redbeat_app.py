"""A standalone Celery app for the redbeat side of ``benchmarks.failover``.

Configured from the environment so each benchmark case gets its own keys:

- ``BENCH_REDBEAT_PREFIX``: ``redbeat_key_prefix`` (the lock key is ``<prefix>:lock``) and
  the default queue name, so the run can delete everything it wrote afterwards.
- ``BENCH_REDBEAT_LOCK_TIMEOUT`` / ``BENCH_REDBEAT_MAX_LOOP``: ``redbeat_lock_timeout`` and
  ``beat_max_loop_interval``; unset means redbeat's / Celery's defaults.

One entry fires every second; no worker consumes it (the queue is only counted).
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = "redis://127.0.0.1:6379/15"
PREFIX = os.environ.get("BENCH_REDBEAT_PREFIX", "bench-failover")

app = Celery("bench_redbeat")
app.conf.update(
    broker_url=REDIS_URL,
    broker_connection_retry_on_startup=True,
    redbeat_redis_url=REDIS_URL,
    redbeat_key_prefix=PREFIX,
    task_default_queue=f"{PREFIX}:queue",
    timezone="UTC",
    beat_schedule={"tick": {"task": "bench.tick", "schedule": 1.0}},
)
if os.environ.get("BENCH_REDBEAT_LOCK_TIMEOUT"):
    app.conf.redbeat_lock_timeout = int(os.environ["BENCH_REDBEAT_LOCK_TIMEOUT"])
if os.environ.get("BENCH_REDBEAT_MAX_LOOP"):
    app.conf.beat_max_loop_interval = int(os.environ["BENCH_REDBEAT_MAX_LOOP"])
