"""Leader-elected beat under load (``runcluster``) vs django-celery-beat's DatabaseScheduler.

    .venv/bin/python -m benchmarks.beat --db postgres|sqlite --schedules 100000 [--duration 60]
        [--compare-scales] [--skip-dbs]

Schedules (django-celery-beat ``PeriodicTask`` rows, task ``demo.ping``, bulk-created in a
fresh database: PostgreSQL ``cs_bench_beat`` or SQLite in a temp dir):

- ``1 - cron_share`` (default 95 %) interval schedules, every ``--interval`` s (default
  100), each anchored (``start_time``) at its own phase spread evenly over the interval,
  so their ticks fall due at a steady rate: N * 0.95 / 100 per second;
- ``cron_share`` (5 %) crontab schedules ``k-59/5 * * * *`` (k = row % 5): each runs every
  5 minutes, a fifth of them at second 0 of every minute (cron ticks cannot be spread
  within a minute), so each minute opens with a burst of N * 1 % ticks.
- 100k schedules: 950 interval ticks/s + a 1,000-tick burst every minute = 967 ticks/s.

``last_run_at`` is set to each schedule's previous tick, so both schedulers start in
phase with nothing overdue; it (and ``total_run_count``) is reset, by re-creating the
rows, before the DatabaseScheduler run, since our leader writes it too.

Ours: ONE ``python manage.py runcluster`` (broker Redis db ``--redis-db``, flushed first;
``DJANGO_DEBUG=0``; no demo singletons; ``overlap=allow_all`` since nothing consumes the
tasks: with the default ``skip`` every later tick of a schedule would be skipped, its run
never finishing). Startup = process start to the first ``published_at`` in the ledger.
The window opens ``--warmup`` s after that, or later, once the startup backlog is
drained (the last 50 rows published < 1 s late; at most ``--max-warmup`` s after the first
publication; the catch-up of ticks due before the window is reported apart), and lasts
``--duration`` s; CPU = utime+stime of the process from ``/proc/<pid>/stat`` at both ends;
after it the leader gets up to ``--grace`` s to publish every tick due in the window, then
is stopped. Lateness = ``published_at - tick`` over the ledger rows whose tick falls in
the window, both on the leader's clock (the tick as it computed it; ``published_at`` the
moment the batch holding the message was flushed to Redis, so every row of a batch shows
the lateness of its last message); throughput = rows whose ``published_at`` falls in it.
The broker check counts the messages in the Redis queue (LLEN, then every message's task
id) against the ledger's published rows.

DatabaseScheduler: ``celery -A project beat -S django_celery_beat.schedulers:DatabaseScheduler``
(default log level) on the same rows with another Redis db; startup = process start to
the first message in Redis; dispatch rate = LLEN delta over a window of the same shape;
at its end it is sent SIGTERM (it saves ``last_run_at`` of what it sent), and a schedule
is "overdue" if its next due time computed from ``last_run_at`` (``last_run_at +
interval``, or the next cron time after it) is more than 1 s before the window end. The
same count is taken for ours from a snapshot of the rows at its window end.

``--compare-scales``: 10k schedules at the same interval (1/10 of the due work), 10k at
interval/10 (the same due work as the full scale) and the full scale, to show whether CPU
per tick follows the due work or the number of schedules.

Every process started here is stopped by PID (SIGTERM, SIGKILL after a deadline) in a
``finally``; the bench database, the temp dir and the two Redis dbs are cleaned up.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis

from benchmarks.failover import PG_SERVER, REPO, Child, Procs, machine, wait_for

PG_DB = "cs_bench_beat"
REDIS = "redis://127.0.0.1:6379"
QUEUE = "celery"
ANCHOR = datetime(2025, 1, 1, tzinfo=UTC)  # interval phases are offsets from here
CRON_STEP = 5  # crontab rows: "k-59/5 * * * *"
TASK = "demo.ping"
TARGET_P99_MS = 100.0
TARGET_RATE = 1000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
LEADER_JSON = {"overlap": "allow_all"}
CAUGHT_UP_ROWS, CAUGHT_UP_S = 50, 1.0
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)


# -- schedules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where every schedule's ticks fall: n_int interval rows, n_cron crontab rows."""

    n: int
    interval: int
    cron_share: float

    @property
    def n_cron(self) -> int:
        return round(self.n * self.cron_share)

    @property
    def n_int(self) -> int:
        return self.n - self.n_cron

    @property
    def due_per_s(self) -> float:
        return self.n_int / self.interval + self.n_cron / (CRON_STEP * 60)

    @property
    def label(self) -> str:
        return f"{self.n // 1000}k@{self.interval}s"

    def start(self, i: int) -> datetime:
        return ANCHOR + timedelta(seconds=i * self.interval / self.n_int)

    def interval_prev(self, i: int, at: datetime) -> datetime:
        """The last tick of interval row ``i`` at or before ``at``."""
        start = self.start(i)
        steps = math.floor((at - start).total_seconds() / self.interval)
        return start + timedelta(seconds=steps * self.interval)

    def expected(self, t0: float, t1: float) -> int:
        """Ticks due in [t0, t1) (Unix seconds), all schedules."""
        total = 0
        base = ANCHOR.timestamp()
        for i in range(self.n_int):
            s = base + i * self.interval / self.n_int
            total += math.ceil((t1 - s) / self.interval) - math.ceil((t0 - s) / self.interval)
        minutes = range(math.ceil(t0 / 60), math.ceil(t1 / 60))  # minute boundaries in window
        per_k = Counter(j % CRON_STEP for j in range(self.n_cron))
        total += sum(per_k[m % CRON_STEP] for m in minutes)
        return total


def cron_prev(k: int, at: datetime) -> datetime:
    """The last fire of "k-59/5 * * * *" at or before ``at`` (minute % 5 == k, second 0)."""
    m = math.floor(at.timestamp() / 60)
    while m % CRON_STEP != k:
        m -= 1
    return datetime.fromtimestamp(m * 60, UTC)


def cron_next(k: int, after: datetime) -> datetime:
    m = math.floor(after.timestamp() / 60) + 1
    while m % CRON_STEP != k:
        m += 1
    return datetime.fromtimestamp(m * 60, UTC)


def create_schedules(layout: Layout) -> float:
    """(Re)create the bench rows, each ``last_run_at`` at its previous tick; returns the
    reference time (Unix s) those were computed for."""
    from django.db import connection
    from django_celery_beat.models import (
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
        PeriodicTasks,
    )

    with connection.cursor() as cursor:  # raw: a queryset delete sends a signal per row
        cursor.execute(f"DELETE FROM {PeriodicTask._meta.db_table}")
    every, _ = IntervalSchedule.objects.get_or_create(every=layout.interval, period="seconds")
    crons = [
        CrontabSchedule.objects.get_or_create(
            minute=f"{k}-59/{CRON_STEP}",
            hour="*",
            day_of_week="*",
            day_of_month="*",
            month_of_year="*",
            timezone="UTC",
        )[0]
        for k in range(CRON_STEP)
    ]
    now = datetime.now(UTC)
    rows = [
        PeriodicTask(
            name=f"bench-i-{i:06d}",
            task=TASK,
            interval=every,
            start_time=layout.start(i),
            last_run_at=layout.interval_prev(i, now),
        )
        for i in range(layout.n_int)
    ]
    rows += [
        PeriodicTask(
            name=f"bench-c-{j:06d}",
            task=TASK,
            crontab=crons[j % CRON_STEP],
            last_run_at=cron_prev(j % CRON_STEP, now),
        )
        for j in range(layout.n_cron)
    ]
    PeriodicTask.objects.bulk_create(rows, batch_size=5000)
    PeriodicTasks.update_changed()
    return now.timestamp()


def overdue(at: float) -> int:
    """Bench schedules whose next due time from ``last_run_at`` is more than 1 s before
    ``at``."""
    from django_celery_beat.models import PeriodicTask

    limit = datetime.fromtimestamp(at - 1.0, UTC)
    n = 0
    rows = (
        PeriodicTask.objects.filter(name__startswith="bench-")
        .values_list("interval__every", "crontab__minute", "last_run_at")
        .iterator(10000)
    )
    for every, minute, last in rows:
        if last is None:
            n += 1
        elif every is not None:
            n += last + timedelta(seconds=every) < limit
        else:
            n += cron_next(int(minute.split("-")[0]), last) < limit
    return n


def caught_up() -> bool:
    """Whether the last ``CAUGHT_UP_ROWS`` ledger rows published were on time (each
    published less than ``CAUGHT_UP_S`` after its tick): the startup backlog is drained."""
    from cluster_singletons.models import Run

    recent = (
        Run.objects.filter(published_at__isnull=False)
        .order_by("-id")
        .values_list("tick", "published_at")[:CAUGHT_UP_ROWS]
    )
    return bool(recent) and all((p - t).total_seconds() < CAUGHT_UP_S for t, p in recent)


# -- processes, CPU -------------------------------------------------------------------------


def library_stamp() -> dict[str, Any]:
    """Which library code a process started now runs: a hash of ``cluster_singletons``'s
    sources and the newest file's mtime (it may be edited while the benchmark runs)."""
    digest = hashlib.sha256()
    newest = 0.0
    for path in sorted((REPO / "cluster_singletons").rglob("*.py")):
        digest.update(path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    return {
        "sha256": digest.hexdigest()[:12],
        "newest_mtime": datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds"),
    }


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` from /proc, seconds; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class PgBackends:
    """CPU of the bench database's server backends (PostgreSQL runs on this machine)."""

    def __init__(self, db: str) -> None:
        self.enabled = db == "postgres"

    def sample(self) -> dict[int, float]:
        if not self.enabled:
            return {}
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
            pids = [p for (p,) in cursor.fetchall()]
        return {p: c for p in pids if (c := cpu_seconds(p)) is not None}

    @staticmethod
    def used(a: dict[int, float], b: dict[int, float]) -> float | None:
        both = set(a) & set(b)  # none in common: the process reconnects (CONN_MAX_AGE=0)
        return sum(b[p] - a[p] for p in both) if both else None


def redis_cpu() -> float | None:
    pid = redis.Redis.from_url(REDIS).info("server").get("process_id")
    return cpu_seconds(int(pid)) if pid else None


def stop(child: Child, grace: float) -> tuple[float, bool]:
    """SIGTERM, then SIGKILL after ``grace``; (seconds to exit, exited by itself)."""
    t0 = time.monotonic()
    if not child.alive:
        return 0.0, True
    try:
        os.kill(child.pid, signal.SIGTERM)
        child.proc.wait(grace)
        return time.monotonic() - t0, True
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.proc.wait()
    return time.monotonic() - t0, False


def log_problems(child: Child, limit: int = 8) -> list[str]:
    lines = [
        ln
        for ln in child.text().splitlines()
        if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln or "Error" in ln
    ]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def sleep_until(t: float, child: Child) -> None:
    while (left := t - time.time()) > 0:
        if not child.alive:
            raise RuntimeError(
                f"pid {child.pid} exited (code {child.proc.returncode}); "
                f"log: {child.log}\n{child.text()[-3000:]}"
            )
        time.sleep(min(left, 0.5))


# -- statistics -----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def lat_summary(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 0.5) or 0, 1),
        "p99_ms": round(pct(ms, 0.99) or 0, 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


# -- the runs -------------------------------------------------------------------------------


class Bench:
    """The bench's processes, its environment and its fresh database (PostgreSQL ``pg_db``
    or SQLite in ``tmp``); ``benchmarks.failover --schedules`` runs on it too."""

    def __init__(self, args: argparse.Namespace, tmp: Path, pg_db: str = PG_DB) -> None:
        self.args, self.tmp, self.procs, self.pg_db = args, tmp, Procs(tmp), pg_db
        self.pg = PgBackends(args.db)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"CLUSTER_SINGLETONS_JSON", "DATABASE_URL", "CELERY_BROKER_URL"}
        }
        env.update(
            CLUSTER_VAR_DIR=str(tmp),
            PYTHONUNBUFFERED="1",
            DJANGO_DEBUG="0",
            DJANGO_SETTINGS_MODULE="project.settings",
            CLUSTER_DEMO_SINGLETONS="none",
        )
        if args.db == "postgres":
            env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{pg_db}"
        self.env = env

    # database

    def setup_django(self) -> None:
        os.environ.update(self.env)
        for var in ("CLUSTER_SINGLETONS_JSON", "CELERY_BROKER_URL"):
            os.environ.pop(var, None)
        if self.args.db == "sqlite":
            os.environ.pop("DATABASE_URL", None)
        import django

        django.setup()

    def fresh_db(self) -> None:
        from django.core.management import call_command
        from django.db import connections

        connections.close_all()
        if self.args.db == "postgres":
            pg_admin(f"DROP DATABASE IF EXISTS {self.pg_db} WITH (FORCE)")
            pg_admin(f"CREATE DATABASE {self.pg_db}")
        else:
            for suffix in ("", "-wal", "-shm"):
                (self.tmp / f"db.sqlite3{suffix}").unlink(missing_ok=True)
        call_command("migrate", verbosity=0)

    def db_version(self) -> str:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SHOW server_version" if self.args.db == "postgres" else "SELECT sqlite_version()"
            )
            return f"{connection.display_name} {cursor.fetchone()[0]}"

    # ours

    def run_leader(self, layout: Layout) -> dict[str, Any]:
        from django.db.models import Count, Sum

        from cluster_singletons.models import Run

        a = self.args
        r = redis.Redis.from_url(f"{REDIS}/{a.redis_db}")
        r.flushdb()
        env = {
            **self.env,
            "CELERY_BROKER_URL": f"{REDIS}/{a.redis_db}",
            "CLUSTER_SINGLETONS_JSON": json.dumps(LEADER_JSON),
        }
        t_spawn = time.time()
        cmd = [sys.executable, "manage.py", "runcluster"]
        if a.profile:  # a diagnostic run: profiling slows the engine down
            cmd = [
                sys.executable,
                "-m",
                "benchmarks._profiled_runcluster",
                str(Path(a.profile).resolve().with_suffix(f".{layout.label}.pstats")),
            ]
        child = self.procs.start(f"leader-{layout.label}", cmd, env, REPO)
        out: dict[str, Any] = {"scheduler": "leader", "pid": child.pid, "library": library_stamp()}
        try:

            def first_published() -> datetime | None:
                if not child.alive:
                    raise RuntimeError(f"leader exited early:\n{child.text()[-3000:]}")
                if not Run.objects.filter(status=Run.Status.PUBLISHED).exists():
                    return None
                return (
                    Run.objects.filter(published_at__isnull=False)
                    .order_by("published_at")
                    .values_list("published_at", flat=True)
                    .first()
                )

            first = wait_for(
                "the first published ledger row", first_published, a.startup_timeout, 0.05
            )
            out["startup_s"] = round(first.timestamp() - t_spawn, 3)
            loaded = re.search(r"^(\S+ \S+) .*beat leader \(epoch", child.text(), re.M)
            if loaded:
                at = datetime.strptime(loaded[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out["engine_loaded_s"] = round(at - t_spawn, 3)
            t0 = max(time.time(), first.timestamp() + a.warmup)
            sleep_until(t0, child)

            try:  # open the window once the startup backlog is drained, if it gets drained
                wait_for(
                    "the leader to catch up", caught_up, max(0.0, a.max_warmup - a.warmup), 0.5
                )
                out["caught_up_s"] = round(time.time() - t_spawn, 1)
            except TimeoutError:
                out["caught_up_s"] = None
            t0, cpu0, pg0, rc0, llen0 = (
                time.time(),
                cpu_seconds(child.pid),
                self.pg.sample(),
                redis_cpu(),
                r.llen(QUEUE),
            )
            sleep_until(t0 + a.duration, child)
            t1, cpu1, pg1, rc1, llen1 = (
                time.time(),
                cpu_seconds(child.pid),
                self.pg.sample(),
                redis_cpu(),
                r.llen(QUEUE),
            )
            out["overdue_at_end"] = overdue(t1)
            w0, w1 = (datetime.fromtimestamp(t, UTC) for t in (t0, t1))

            def drained() -> bool:  # every tick due in the window recorded and published
                if not child.alive:
                    raise RuntimeError("leader exited during the drain")
                return (
                    Run.objects.filter(tick__gte=w1).exists()
                    and not Run.objects.filter(tick__lt=w1, status=Run.Status.PENDING).exists()
                )

            t_drain = time.monotonic()
            try:
                wait_for("the leader to publish the window's ticks", drained, a.grace, 0.2)
                out["drain_s"] = round(time.monotonic() - t_drain, 2)
            except TimeoutError:
                out["drain_s"] = None
        finally:
            stop_s, clean = stop(child, 20.0)
            out["stop_s"], out["stopped_cleanly"] = round(stop_s, 2), clean
            out["exit_code"] = child.proc.returncode
            out["log_problems"] = log_problems(child)
        window = t1 - t0
        cpu = (cpu1 or 0) - (cpu0 or 0)
        rows = list(
            Run.objects.filter(kind=Run.Kind.SCHEDULED, tick__gte=w0, tick__lt=w1).values_list(
                "schedule", "tick", "published_at", "status", "ticks", "created_at"
            )
        )
        lat: dict[str, list[float]] = {"interval": [], "crontab": []}
        by_slice: dict[int, list[float]] = defaultdict(list)
        per_second: dict[int, float] = {}
        late_sched: set[str] = set()
        unpublished = Counter()
        # published_at is the time its batch was flushed: rows sharing one went out together
        per_batch = Counter(published for _, _, published, *_ in rows if published is not None)
        # created_at is the recording statement's time: how long before its tick a row was
        # recorded (negative: after)
        ahead = [(tick - created).total_seconds() * 1000 for _, tick, *_, created in rows]
        for key, tick, published, status, _, _ in rows:
            if published is None:
                unpublished[status] += 1
                if status != Run.Status.SKIPPED:
                    late_sched.add(key)
                continue
            ms = (published - tick).total_seconds() * 1000
            lat["crontab" if key.startswith("periodic:bench-c-") else "interval"].append(ms)
            offset = tick.timestamp() - t0
            by_slice[int(offset // 10)].append(ms)
            sec = int(tick.timestamp() - t_spawn)
            per_second[sec] = max(per_second.get(sec, 0.0), ms)
            if ms > 1000:
                late_sched.add(key)
        all_ms = lat["interval"] + lat["crontab"]
        published_in_window = Run.objects.filter(published_at__gte=w0, published_at__lt=w1).count()
        before = [
            (p - t).total_seconds() * 1000
            for t, p in Run.objects.filter(
                kind=Run.Kind.SCHEDULED, tick__lt=w0, published_at__isnull=False
            ).values_list("tick", "published_at")
        ]
        skipped = Run.objects.filter(status=Run.Status.SKIPPED).aggregate(
            rows=Count("id"), ticks=Sum("ticks"), schedules=Count("schedule", distinct=True)
        )
        statuses = dict(Run.objects.values_list("status").annotate(n=Count("id")))
        coalesced = Run.objects.filter(ticks__gt=1).count()
        marks = sorted(
            t.timestamp()
            for t in Run.objects.filter(  # batches marked in the window
                published_at__gte=w0, published_at__lt=w1
            )
            .values_list("published_at", flat=True)
            .distinct()
        )
        gaps = sorted(((b - a_, a_) for a_, b in itertools.pairwise(marks)), reverse=True)[:6]
        expected = layout.expected(t0, t1)
        recorded = sum(row[4] for row in rows)
        ledger_published = Run.objects.filter(published_at__isnull=False).count()
        llen_end = r.llen(QUEUE)
        ids = broker_ids(r) if a.check_ids else None
        id_set = ids.pop("_ids") if ids else None
        out.update(
            {
                "window_s": round(window, 2),
                "due_per_s_expected": round(expected / window, 1),
                "ticks_due_in_window": expected,
                "ticks_recorded_in_window": recorded,
                "published_per_s": round(published_in_window / window, 1),
                "broker_per_s_window": round((llen1 - llen0) / window, 1),
                "lateness": lat_summary(all_ms),
                "lateness_interval": lat_summary(lat["interval"]),
                "lateness_crontab": lat_summary(lat["crontab"]),
                "lateness_p99_by_10s_slice_ms": [
                    round(pct(by_slice[k], 0.99) or 0, 1) for k in sorted(by_slice)
                ],
                "worst_seconds": [
                    {"t_since_spawn_s": s, "max_ms": round(v, 1)}
                    for s, v in sorted(per_second.items(), key=lambda kv: -kv[1])[:5]
                ],
                "catch_up_before_window": lat_summary(before),
                "unpublished_in_window": dict(unpublished),
                "rows_per_publish_batch": {
                    "batches": len(per_batch),
                    "mean": round(sum(per_batch.values()) / len(per_batch), 2)
                    if per_batch
                    else None,
                    "p50": pct(list(per_batch.values()), 0.5),
                    "max": max(per_batch.values(), default=None),
                },
                "recorded_ahead_of_tick": lat_summary(ahead),
                "late_over_1s_schedules": len(late_sched),
                "longest_publish_gaps": [
                    {"gap_s": round(g, 2), "from_s_since_spawn": round(at - t_spawn, 1)}
                    for g, at in sorted(gaps, key=lambda x: x[1])
                ],
                "skipped": {k: v or 0 for k, v in skipped.items()},
                "coalesced_rows": coalesced,
                "ledger_statuses": statuses,
                "cpu_s": round(cpu, 2),
                "cpu_s_per_min": round(cpu / window * 60, 2),
                "cpu_ms_per_tick": round(cpu * 1000 / published_in_window, 3)
                if published_in_window
                else None,
                "db_cpu_s_per_min": _per_min(PgBackends.used(pg0, pg1), window),
                "redis_cpu_s_per_min": _per_min(
                    (rc1 - rc0) if rc0 is not None and rc1 is not None else None, window
                ),
                "broker": {
                    "llen": llen_end,
                    "ledger_published": ledger_published,
                    "ledger_pending": statuses.get(Run.Status.PENDING, 0),
                    "match": llen_end == ledger_published,
                    **(ids or {}),
                },
            }
        )
        if id_set is not None:
            ledger_ids = set(
                Run.objects.filter(published_at__isnull=False).values_list("task_id", flat=True)
            )
            out["broker"]["ledger_ids_missing_in_broker"] = len(ledger_ids - id_set)
        r.flushdb()
        return out

    # django-celery-beat

    def run_dbs(self, layout: Layout) -> dict[str, Any]:
        a = self.args
        ref = create_schedules(layout)  # resets last_run_at / total_run_count
        r = redis.Redis.from_url(f"{REDIS}/{a.dbs_redis_db}")
        r.flushdb()
        env = {**self.env, "CELERY_BROKER_URL": f"{REDIS}/{a.dbs_redis_db}"}
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "beat",
            "-S",
            "django_celery_beat.schedulers:DatabaseScheduler",
        ]
        t_spawn = time.time()
        out: dict[str, Any] = {
            "scheduler": "dbs",
            "reset_to_s_before_spawn": round(t_spawn - ref, 2),
        }
        child = self.procs.start(f"dbs-{layout.label}", cmd, env, REPO)
        out["pid"] = child.pid
        try:

            def first_message() -> bool:
                if not child.alive:
                    raise RuntimeError(f"celery beat exited early:\n{child.text()[-3000:]}")
                return r.llen(QUEUE) > 0

            try:
                wait_for(
                    "the DatabaseScheduler's first message",
                    first_message,
                    a.dbs_startup_timeout,
                    0.05,
                )
            except TimeoutError:
                out["startup_s"] = None
                out["note"] = f"no message within {a.dbs_startup_timeout:.0f}s"
                out["cpu_s_per_min"] = _per_min(cpu_seconds(child.pid), time.time() - t_spawn)
                return out
            first = time.time()
            out["startup_s"] = round(first - t_spawn, 3)
            t0 = first + a.warmup
            sleep_until(t0, child)
            t0, cpu0, pg0 = time.time(), cpu_seconds(child.pid), self.pg.sample()
            llen0 = r.llen(QUEUE)
            per_s = []
            last = llen0
            while time.time() < t0 + a.duration:
                sleep_until(min(time.time() + 1.0, t0 + a.duration), child)
                now_len = r.llen(QUEUE)
                per_s.append(now_len - last)
                last = now_len
            t1, cpu1, pg1 = time.time(), cpu_seconds(child.pid), self.pg.sample()
            llen1 = r.llen(QUEUE)
        finally:
            stop_s, clean = stop(child, a.dbs_stop_timeout)
            out["stop_s"], out["stopped_cleanly"] = round(stop_s, 2), clean
            out["exit_code"] = child.proc.returncode
            out["log_problems"] = log_problems(child)
        window = t1 - t0
        cpu = (cpu1 or 0) - (cpu0 or 0)
        sent = llen1 - llen0
        expected = layout.expected(t0, t1)
        out.update(
            {
                "window_s": round(window, 2),
                "due_per_s_expected": round(expected / window, 1),
                "ticks_due_in_window": expected,
                "broker_per_s_window": round(sent / window, 1),
                "broker_per_s_min_max": [min(per_s), max(per_s)] if per_s else None,
                "messages_total": r.llen(QUEUE),
                "overdue_at_end": overdue(t1),
                "overdue_valid": clean,  # last_run_at is only saved by a clean exit (sync)
                "cpu_s": round(cpu, 2),
                "cpu_s_per_min": round(cpu / window * 60, 2),
                "cpu_ms_per_tick": round(cpu * 1000 / sent, 3) if sent else None,
                "db_cpu_s_per_min": _per_min(PgBackends.used(pg0, pg1), window),
            }
        )
        r.flushdb()
        return out


def _per_min(cpu: float | None, window: float) -> float | None:
    return None if cpu is None else round(cpu / window * 60, 2)


def broker_ids(r: redis.Redis) -> dict[str, Any]:
    """Every message's task id in the queue: count, distinct, duplicates."""
    ids: Counter[str] = Counter()
    n = r.llen(QUEUE)
    for start in range(0, n, 5000):
        for raw in r.lrange(QUEUE, start, start + 4999):
            ids[json.loads(raw)["headers"]["id"]] += 1
    dups = sum(c - 1 for c in ids.values() if c > 1)
    return {
        "messages_parsed": sum(ids.values()),
        "distinct_task_ids": len(ids),
        "duplicate_messages": dups,
        "_ids": set(ids),
    }


def pg_admin(sql: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(sql)


# -- report ---------------------------------------------------------------------------------


def cell(v: Any) -> str:
    return "-" if v is None else str(v)


def print_table(results: list[dict[str, Any]]) -> None:
    cols = [
        ("case", 10),
        ("scheduler", 9),
        ("due/s", 7),
        ("startup s", 9),
        ("sent/s", 7),
        ("lat p50", 8),
        ("lat p99", 8),
        ("lat max", 8),
        ("CPU s/min", 9),
        ("ms/tick", 7),
        ("db CPU", 7),
        (">1s late", 8),
        ("skipped", 7),
        ("overdue", 7),
        ("broker=ledger", 13),
    ]
    head = " ".join(f"{t:>{w}}" for t, w in cols)
    print(head)
    print("-" * len(head))
    for res in results:
        for run in (res["leader"], res.get("dbs")):
            if not run:
                continue
            lat = run.get("lateness", {})
            b = run.get("broker")
            values = [
                res["case"],
                run["scheduler"],
                run.get("due_per_s_expected"),
                run.get("startup_s"),
                run.get("published_per_s", run.get("broker_per_s_window")),
                lat.get("p50_ms"),
                lat.get("p99_ms"),
                lat.get("max_ms"),
                run.get("cpu_s_per_min"),
                run.get("cpu_ms_per_tick"),
                run.get("db_cpu_s_per_min"),
                run.get("late_over_1s_schedules"),
                run["skipped"]["schedules"] if "skipped" in run else None,
                run.get("overdue_at_end")
                if run.get("overdue_valid", True)
                else f"({run.get('overdue_at_end')})",
                (
                    f"{b['llen']}={b['ledger_published']}"
                    if b["match"]
                    else f"{b['llen']}!={b['ledger_published']}"
                )
                if b
                else None,
            ]
            print(" ".join(f"{cell(v):>{w}}" for v, (_, w) in zip(values, cols, strict=True)))
    print(
        "(due/s = ticks falling due per second in the window; sent/s = ledger rows published "
        "per second (leader) or messages the broker received per second (dbs = django-celery-"
        "beat DatabaseScheduler); lat = published_at - tick over the window's ticks, ms, p99 "
        "nearest rank; CPU = the scheduler process, s per minute of window; ms/tick = CPU ms "
        "per tick sent; db CPU = its PostgreSQL backends, s/min ('-': no connection kept "
        "across the window, as the DatabaseScheduler reconnects each tick); >1s late = "
        "schedules with a window tick published > 1 s late or not at all; skipped = schedules"
        " with a skipped tick; overdue = schedules whose next due time from last_run_at is > "
        "1 s before the window end, in parentheses if the process did not exit cleanly "
        "(last_run_at not saved); broker=ledger = messages in the Redis queue vs ledger rows "
        "published; published_at is the time the batch holding the message was flushed to "
        "the broker, so every row of a batch shows the lateness of its last message)"
    )


def print_details(results: list[dict[str, Any]], db: str) -> None:
    for res in results:
        ld = res["leader"]
        print(
            f"\n[{res['case']}] {res['schedules']} schedules ({res['n_interval']} interval every"
            f" {res['interval']}s + {res['n_cron']} crontab k-59/5): due {res['due_per_s']}/s"
        )
        print(
            f"  leader: engine loaded {cell(ld.get('engine_loaded_s'))}s, first published"
            f" {ld['startup_s']}s, library {ld['library']},"
            f" caught up (last {CAUGHT_UP_ROWS} rows < {CAUGHT_UP_S:g} s"
            f" late) {cell(ld.get('caught_up_s'))}s after spawn; catch-up of ticks due"
            " before the window:"
            f" {ld['catch_up_before_window']}"
        )
        print(
            f"  leader lateness interval {ld['lateness_interval']}; crontab"
            f" {ld['lateness_crontab']}"
        )
        print(f"  leader p99 by 10 s slice (ms): {ld['lateness_p99_by_10s_slice_ms']}")
        print(
            "  leader longest gaps between batch publications in the window (s since spawn:"
            " gap s): "
            + ", ".join(
                f"{g['from_s_since_spawn']}: {g['gap_s']}" for g in ld["longest_publish_gaps"]
            )
        )
        print(
            "  leader worst seconds (tick s since spawn: max ms): "
            + ", ".join(f"{w['t_since_spawn_s']}: {w['max_ms']}" for w in ld["worst_seconds"])
        )
        print(
            f"  leader ticks due in window {ld['ticks_due_in_window']}, recorded"
            f" {ld['ticks_recorded_in_window']}, unpublished {ld['unpublished_in_window']},"
            f" drained {cell(ld['drain_s'])}s after the window, ledger {ld['ledger_statuses']},"
            f" rows per publish batch {ld['rows_per_publish_batch']},"
            f" recorded ahead of the tick (ms) {ld['recorded_ahead_of_tick']},"
            f" coalesced rows {ld['coalesced_rows']}, skipped {ld['skipped']}"
        )
        print(
            f"  leader broker {ld['broker']}; redis CPU {cell(ld['redis_cpu_s_per_min'])} s/min;"
            f" stop {ld['stop_s']}s clean={ld['stopped_cleanly']} exit={ld['exit_code']}"
        )
        if ld["log_problems"]:
            print("  leader log warnings/errors:\n    " + "\n    ".join(ld["log_problems"]))
        if d := res.get("dbs"):
            print(
                f"  dbs: startup {cell(d.get('startup_s'))}s,"
                f" sent {cell(d.get('broker_per_s_window'))}/s"
                f" (per-second min/max {d.get('broker_per_s_min_max')}) of"
                f" {d.get('due_per_s_expected')}/s due, messages {d.get('messages_total')},"
                f" overdue at end {d.get('overdue_at_end')} (valid={d.get('overdue_valid')}),"
                f" stop (sync) {d['stop_s']}s clean={d['stopped_cleanly']}"
                + (f"; {d['note']}" if d.get("note") else "")
            )
            if d["log_problems"]:
                print("  dbs log warnings/errors:\n    " + "\n    ".join(d["log_problems"]))
    full = results[-1]["leader"]
    p99 = full["lateness"].get("p99_ms")
    rate = full.get("published_per_s")
    if db == "postgres":
        met = p99 is not None and p99 <= TARGET_P99_MS
        verdict = "met" if met else "MISSED"
        if full["due_per_s_expected"] < 0.9 * TARGET_RATE:
            verdict = f"not evaluated (only {full['due_per_s_expected']}/s due)"
        print(
            f"\ntarget: p99 lateness <= {TARGET_P99_MS:g} ms at ~{TARGET_RATE:g} ticks/s on"
            f" PostgreSQL: {verdict} (p99 {p99} ms at {rate}/s published,"
            f" {full['due_per_s_expected']}/s due, case {results[-1]['case']})"
        )
    if len(results) > 1:
        print(
            "CPU per tick (leader): "
            + "; ".join(
                f"{r['case']} ({r['due_per_s']}/s due): {cell(r['leader']['cpu_ms_per_tick'])} ms"
                for r in results
            )
            + "  [target: grows with due work, not with the number of schedules]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--schedules", type=int, default=100_000)
    parser.add_argument("--interval", type=int, default=100, help="interval rows' period, s")
    parser.add_argument("--cron-share", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=60.0, help="measurement window, s")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="s after the first publication before the window opens",
    )
    parser.add_argument(
        "--max-warmup",
        type=float,
        default=180.0,
        help="leader: past --warmup, wait up to this long (from the first"
        " publication) for the startup backlog to drain before the window",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="s the leader gets after the window to publish its ticks",
    )
    parser.add_argument(
        "--compare-scales",
        action="store_true",
        help="also 10k at --interval and 10k at the full scale's due rate",
    )
    parser.add_argument("--skip-dbs", action="store_true", help="leave out DatabaseScheduler")
    parser.add_argument("--redis-db", type=int, default=7)
    parser.add_argument("--dbs-redis-db", type=int, default=8)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--dbs-startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--dbs-stop-timeout",
        type=float,
        default=180.0,
        help="s the DatabaseScheduler gets to save last_run_at on SIGTERM",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="diagnostic: profile the leader's engine thread (cProfile), stats"
        " to PATH.<case>.pstats; its timings are then not the benchmark's",
    )
    parser.add_argument(
        "--no-check-ids",
        dest="check_ids",
        action="store_false",
        help="skip reading every message's task id from Redis",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    layouts = [Layout(args.schedules, args.interval, args.cron_share)]
    if args.compare_scales and args.schedules != 10_000:
        small = max(1, round(args.interval * 10_000 / args.schedules))
        layouts = [
            Layout(10_000, args.interval, args.cron_share),
            Layout(10_000, small, args.cron_share),
            *layouts,
        ]
    tmp = Path(tempfile.mkdtemp(prefix="cs-beatbench-"))
    bench = Bench(args, tmp)
    load = [os.getloadavg()]
    results: list[dict[str, Any]] = []
    try:
        bench.setup_django()
        for layout in layouts:
            print(
                f"== {layout.label}: {layout.n} schedules, {layout.due_per_s:.1f} ticks/s due",
                file=sys.stderr,
                flush=True,
            )
            bench.fresh_db()
            t = time.monotonic()
            create_schedules(layout)
            created_s = round(time.monotonic() - t, 1)
            res: dict[str, Any] = {
                "case": layout.label,
                "schedules": layout.n,
                "interval": layout.interval,
                "n_interval": layout.n_int,
                "n_cron": layout.n_cron,
                "due_per_s": round(layout.due_per_s, 1),
                "bulk_create_s": created_s,
            }
            res["leader"] = bench.run_leader(layout)
            brief = ("startup_s", "published_per_s", "lateness", "cpu_s_per_min")
            print(
                f"   leader: {json.dumps({k: res['leader'][k] for k in brief})}",
                file=sys.stderr,
                flush=True,
            )
            if not args.skip_dbs:
                res["dbs"] = bench.run_dbs(layout)
                brief = ("startup_s", "broker_per_s_window", "cpu_s_per_min", "overdue_at_end")
                print(
                    f"   dbs: {json.dumps({k: res['dbs'].get(k) for k in brief})}",
                    file=sys.stderr,
                    flush=True,
                )
            results.append(res)
            load.append(os.getloadavg())
        db_version = bench.db_version()
    finally:
        bench.procs.stop_all()
        for n in (args.redis_db, args.dbs_redis_db):
            redis.Redis.from_url(f"{REDIS}/{n}").flushdb()
        from django.db import connections

        connections.close_all()
        if args.db == "postgres":
            pg_admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    print_details(results, args.db)
    print(
        machine(db_version)
        + f", load average at start {load[0]}, after each case "
        + ", ".join(str(tuple(round(x, 2) for x in la)) for la in load[1:])
    )
    result = {
        "db": args.db,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "leader_settings": LEADER_JSON,
        "target_p99_ms": TARGET_P99_MS,
        "cores": len(os.sched_getaffinity(0)),
        "loadavg": load,
        "cases": results,
    }
    print("RESULT " + json.dumps(result, separators=(",", ":"), default=str))


if __name__ == "__main__":
    main()
