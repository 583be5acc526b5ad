"""Beat failover end to end at N schedules, for ``benchmarks.failover --schedules N``.

    .venv/bin/python -m benchmarks.failover --db postgres --schedules 100000 [--trials 3]
        [--standby warm,cold] [--runners 3] [--pooler pgbouncer] [--cluster-json '{...}']
        [--profile DIR]

Each ``--standby`` mode (``beat_standby``: warm, the default, keeps the schedules loaded
on every standby; cold loads them at takeover) runs its trials in turn, side by side on
the same schedules and machine.

Schedules: ``benchmarks.beat``'s rows (``Layout``, ``create_schedules``: interval rows every
``--interval`` s spread evenly, plus the crontab share), created once in the fresh database
``cs_bench_beatfail``. Runners: ``manage.py runcluster`` with default settings except
``overlap=allow_all`` (nothing consumes the tasks) and whatever ``--cluster-json`` adds;
broker Redis db ``--redis-db``, flushed before each trial. Each trial starts fresh
processes on the same database, the ledger (``cluster_singletons_run``) emptied first
unless ``--keep-ledger`` (its size at the kill is reported):

1. one runner; it leads ``beat`` at epoch E0; wait until it is steady (the last 50 rows
   published < 1 s late, as ``benchmarks.beat`` decides it);
2. window A (``--alone-window`` s): database-wide counters with the leader alone;
3. start ``--runners - 1`` standbys, let them settle ``--standby-settle`` s, then window B
   (``--standby-window`` s): each standby's CPU (utime + stime, /proc/<pid>/stat) per
   minute, its RSS and peak RSS (VmRSS, VmHWM), and the CPU of its PostgreSQL backends
   (matched by the client ports of its sockets; none behind a pooler); database-wide
   counters again. ``db reads/s per standby`` = (B - A) / standbys of ``xact_commit`` and
   of rows read: ``pg_stat_database`` ``tup_returned + tup_fetched``, and the rows and index
   entries read in user relations but the ledger (``pg_stat_user_tables`` /
   ``_indexes``; a warm standby reads the ledger's new rows, and so does the leader).
   Database-wide counters: an estimate
   (``benchmarks._standby_cost``); pg_stat_statements is not loaded on this server;
4. after a random 0..``renew_interval`` s, SIGKILL the leader at ``t_kill`` (this process's
   wall clock just before ``os.kill``); poll the lease every 10 ms for the new holder;
5. wait until every tick due in [t_kill, t_kill + ``--window``) is published (at most
   ``--grace`` s), then read the ledger.

Measured (``published_at`` and ``tick`` as the leaders wrote them, on their database-
corrected clock; this machine runs the database, so that is this process's clock too):

- ``lateness`` of a row = ``published_at - tick``; a row is *on time* if lateness <= 1 s;
- ``first_on_time_s`` = the first ``published_at`` at or after ``t_kill`` of a scheduled row
  with lateness <= 1 s (whichever epoch recorded it: rows the old leader recorded ahead
  keep its epoch when the new one publishes them), minus ``t_kill``;
  ``first_publish_s`` the same without the lateness condition; ``recovered_s`` = the last
  ``published_at`` of a row published > 1 s late after the kill, minus ``t_kill``;
- over the ticks due in [t_kill, t_kill + window): ``late_over_1s`` = rows published > 1 s
  late plus rows not published by the end (skipped rows apart); p50 / p99 (nearest rank)
  / max lateness; ``missing`` = ticks due (computed from the layout) minus ticks recorded;
  max lateness per second since the kill;
- the new leader: ``takeover_s`` = t_kill to the lease's ``acquired_at`` at epoch E1;
  from that acquisition to its log line ``beat leader (epoch E1, warm|loaded): K
  schedules`` (start() done: load or catch up, open runs, republish) and to its first
  publication.

``--profile DIR``: py-spy (``record --idle --threads --format raw``, 100 Hz) on every
standby from 3 s before the kill until 2 s after the first on-time publication; the new
leader's ``lead:beat`` thread is broken down by phase (``benchmarks._leader_profile``). A
diagnostic: sampling takes CPU from the same two cores, so its timings are not the
benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from django.db import connections
from django.db.models import F

from benchmarks import _failover_report, _kill_window, _leader_profile, _standby_cost
from benchmarks.beat import (
    CAUGHT_UP_ROWS,
    LEADER_JSON,
    REDIS,
    Bench,
    Layout,
    caught_up,
    cpu_seconds,
    create_schedules,
    library_stamp,
    log_problems,
    pg_admin,
)
from benchmarks.failover import HOLDER_SQL, POLL, REPO, SETTINGS, Child, wait_for
from project.demo.pgbouncer import PgBouncer

PG_DB = "cs_bench_beatfail"
LOG_STAMP = "%Y-%m-%d %H:%M:%S,%f"
BRIEF = ("takeover_s", "first_on_time_s", "late_over_1s", "lateness_ms", "acquired_to_loaded_s")
REGISTERED = re.compile(r"runner (\d+) registered")


class Trial:
    """One trial: a fresh cluster on the bench database, its leader killed once."""

    def __init__(
        self, bench: Bench, layout: Layout, env: dict[str, str], number: int, rng: random.Random
    ) -> None:
        self.bench, self.layout, self.env, self.number, self.rng = bench, layout, env, number, rng
        self.a = bench.args
        self.children: list[Child] = []
        self.ids: dict[int, int] = {}  # pid -> runner id

    def start_runner(self, tag: str) -> Child:
        child = self.bench.procs.start(
            f"t{self.number}-{tag}", [sys.executable, "manage.py", "runcluster"], self.env, REPO
        )
        self.children.append(child)
        return child

    def registered(self, child: Child) -> None:
        m = wait_for(
            f"runner pid {child.pid} to register",
            lambda: self.alive(child) and REGISTERED.search(child.text()),
            60,
        )
        self.ids[child.pid] = int(m[1])

    @staticmethod
    def alive(child: Child) -> bool:
        if not child.alive:
            raise RuntimeError(
                f"pid {child.pid} exited ({child.proc.returncode}):"
                f" {child.log}\n{child.text()[-3000:]}"
            )
        return True

    def holder(self) -> tuple[int, int, int] | None:
        """(runner id, pid, epoch) of ``beat``'s holder."""
        rows = _standby_cost.query(
            HOLDER_SQL.replace("SELECT l.holder_id, r.pid", "SELECT l.holder_id, r.pid, l.epoch")
        )
        return rows[0] if rows and rows[0][0] is not None else None

    def run(self) -> dict[str, Any]:
        from cluster_singletons.models import Run

        a, out = self.a, {"trial": self.number}
        redis.Redis.from_url(f"{REDIS}/{a.redis_db}").flushdb()
        t_spawn = time.time()
        leader = self.start_runner("leader")
        self.registered(leader)
        held = wait_for(
            "the first runner to lead 'beat'",
            lambda: (h := self.holder()) and h[1] == leader.pid and h,
            60,
        )
        old_id, _, epoch0 = held
        wait_for(
            "the leader's first publication",
            lambda: (
                self.alive(leader)
                and Run.objects.filter(epoch=epoch0, published_at__isnull=False).exists()
            ),
            a.startup_timeout,
        )
        wait_for(
            "the leader to catch up", lambda: self.alive(leader) and caught_up(), a.max_warmup, 0.5
        )
        out["leader_steady_s"] = round(time.time() - t_spawn, 1)
        c0, l0 = _standby_cost.db_counters(), cpu_seconds(leader.pid)
        time.sleep(a.alone_window)
        c1, l1 = _standby_cost.db_counters(), cpu_seconds(leader.pid)
        standbys = [self.start_runner(f"standby{k + 1}") for k in range(a.runners - 1)]
        for child in standbys:
            self.registered(child)
        time.sleep(a.standby_settle)
        for child in standbys:
            self.alive(child)
        out["standby"] = _standby_cost.measure(
            {self.ids[c.pid]: c for c in standbys}, a.standby_window, _standby_cost.rates(c0, c1)
        )
        out["leader_cpu_s_per_min_alone"] = round(((l1 or 0) - (l0 or 0)) / a.alone_window * 60, 2)
        out["leader_memory_mb"] = _standby_cost.memory_mb(leader.pid)
        out["leader_steady_before_kill"] = caught_up()
        out["ledger_rows_at_kill"] = Run.objects.count()
        spies = _leader_profile.start(standbys, a.profile, self.number) if a.profile else []
        time.sleep(self.rng.uniform(0, SETTINGS.renew_interval) + (3.0 if spies else 0.0))
        if (self.holder() or (None,))[0] != old_id:
            raise RuntimeError("leadership moved before the kill")
        t_kill = time.time()
        os.kill(leader.pid, signal.SIGKILL)
        leader.proc.wait(10)
        out.update(self.after_kill(t_kill, old_id, epoch0, standbys, spies))
        return out

    def after_kill(
        self, t_kill: float, old_id: int, epoch0: int, standbys: list[Child], spies: list[Any]
    ) -> dict[str, Any]:
        from cluster_singletons.models import Lease, Run

        a = self.a
        new = wait_for(
            "a new holder of 'beat'",
            lambda: (h := self.holder()) and h[0] != old_id and h,
            a.grace,
            POLL,
        )
        took = time.time() - t_kill
        new_id, new_pid, epoch1 = new
        child = next(c for c in standbys if c.pid == new_pid)
        kill = datetime.fromtimestamp(t_kill, UTC)
        w1 = datetime.fromtimestamp(t_kill + a.window, UTC)
        scheduled = Run.objects.filter(kind=Run.Kind.SCHEDULED)

        def on_time_after_kill() -> bool:
            self.alive(child)
            return scheduled.filter(
                published_at__gte=kill, published_at__lte=F("tick") + _kill_window.ONE_S
            ).exists()

        if spies:
            wait_for("the first on-time publication", on_time_after_kill, a.grace, 0.05)
            time.sleep(2.0)
            _leader_profile.stop(spies)

        def drained() -> bool:
            self.alive(child)
            return (
                scheduled.filter(tick__gte=w1, published_at__isnull=False).exists()
                and not scheduled.filter(tick__lt=w1, status=Run.Status.PENDING).exists()
            )

        try:
            wait_for("the window's ticks to be published", drained, a.grace, 0.2)
            drain = round(max(0.0, time.time() - t_kill - a.window), 1)
        except TimeoutError:
            drain = None
        acquired = Lease.objects.get(name="beat").acquired_at
        lease_acq = acquired.timestamp() if acquired else None
        out: dict[str, Any] = {
            "new_runner": new_id,
            "epoch_before": epoch0,
            "epoch_after": epoch1,
            "takeover_poll_s": round(took, 3),
            "drain_after_window_s": drain,
            "takeover_s": round(lease_acq - t_kill, 3) if lease_acq else None,
        }
        out.update(_kill_window.measure(t_kill, a.window, self.layout))
        text = child.text()
        loaded = re.search(
            rf"^(\S+ \S+) .*beat leader \(epoch {epoch1}(?:, (\w+))?\): (\d+) schedules",
            text,
            re.M,
        )
        first = out.get("first_publish_s")
        if lease_acq is not None:
            if loaded:
                at = datetime.strptime(loaded[1], LOG_STAMP).timestamp()
                out["acquired_to_loaded_s"] = round(at - lease_acq, 3)
                out["start"] = loaded[2]
                out["schedules_loaded"] = int(loaded[3])
            if first is not None:
                out["acquired_to_first_publish_s"] = round(t_kill + first - lease_acq, 3)
        out["new_leader_log_problems"] = log_problems(child)
        if spies:
            out["profile"] = _leader_profile.report(spies, new_pid)
        return out

    def stop(self) -> None:
        for child in self.children:
            child.stop(20.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every trial at ``args.schedules`` for each standby mode; per mode the summary and
    the trials."""
    tmp = Path(tempfile.mkdtemp(prefix="cs-beatfail-"))
    bench = Bench(args, tmp, pg_db=PG_DB)
    layout = Layout(args.schedules, args.interval, args.cron_share)
    settings = {**LEADER_JSON, **json.loads(args.cluster_json or "{}")}
    modes = [m.strip() for m in args.standby.split(",") if m.strip()]
    env = {**bench.env, "CELERY_BROKER_URL": f"{REDIS}/{args.redis_db}"}
    bouncer = None
    rng = random.Random(args.seed)
    by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    load = [os.getloadavg()]
    try:
        bench.setup_django()
        bench.fresh_db()
        t = time.monotonic()
        create_schedules(layout)
        created = round(time.monotonic() - t, 1)
        if args.pooler == "pgbouncer":
            bouncer = PgBouncer(("127.0.0.1", 5432), user="postgres")
            bouncer.start()
            env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{bouncer.port}/{PG_DB}"
        number = 0
        for mode in modes:
            mode_env = {
                **env,
                "CLUSTER_SINGLETONS_JSON": json.dumps({**settings, "beat_standby": mode}),
            }
            trials = by_mode[mode]
            for _ in range(args.trials):
                number += 1
                if number > 1 and not args.keep_ledger:  # each trial from an empty ledger
                    with connections["default"].cursor() as cursor:
                        cursor.execute("TRUNCATE cluster_singletons_run")
                trial = Trial(bench, layout, mode_env, number, rng)
                try:
                    trials.append({"standby_mode": mode, **trial.run()})
                finally:
                    trial.stop()
                load.append(os.getloadavg())
                brief = {k: trials[-1].get(k) for k in BRIEF}
                print(
                    f"  trial {number} ({mode}): {json.dumps(brief)}", file=sys.stderr, flush=True
                )
        db_version = bench.db_version()
    finally:
        bench.procs.stop_all()
        if bouncer is not None:
            bouncer.close()
        redis.Redis.from_url(f"{REDIS}/{args.redis_db}").flushdb()
        connections.close_all()
        pg_admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "schedules": layout.n,
        "interval": layout.interval,
        "n_cron": layout.n_cron,
        "due_per_s": round(layout.due_per_s, 1),
        "bulk_create_s": created,
        "runners": args.runners,
        "pooler": args.pooler,
        "settings": settings,
        "library": library_stamp(),
        "db_version": db_version,
        "loadavg": load,
        "caught_up_rows": CAUGHT_UP_ROWS,
        "modes": {
            mode: {"trials": trials, "summary": _failover_report.summary(trials)}
            for mode, trials in by_mode.items()
        },
    }


#: (flag, type, default, help) of the --schedules mode's options.
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("--interval", int, 100, "interval rows' period, s"),
    ("--cron-share", float, 0.05, "share of crontab rows"),
    ("--window", int, 30, "s after the kill measured"),
    ("--alone-window", float, 10.0, "s of database counters with the leader alone"),
    ("--standby-settle", float, 20.0, "s after the standbys register before they are measured"),
    ("--standby-window", float, 20.0, "s the standbys are measured"),
    ("--max-warmup", float, 180.0, "s for a new cluster's leader to drain its startup backlog"),
    ("--startup-timeout", float, 180.0, "s for a new cluster's leader to publish"),
    ("--grace", float, 120.0, "s for a takeover and for the window's ticks to be published"),
    ("--redis-db", int, 11, "the broker's Redis db (flushed)"),
    ("--cluster-json", str, None, "settings the runners get on top of overlap=allow_all (JSON)"),
    ("--standby", str, "warm,cold", "beat_standby modes run side by side, comma-separated"),
    ("--profile", str, None, "DIR: py-spy the standbys through the takeover (a diagnostic run)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--schedules (beat failover end to end)")
    group.add_argument(
        "--runners",
        type=int,
        default=3,
        choices=[2, 3],
        help="runcluster processes: the leader and its standbys",
    )
    group.add_argument(
        "--keep-ledger",
        action="store_true",
        help="keep the ledger across trials (default: emptied before each)",
    )
    for flag, kind, default, text in OPTIONS:
        group.add_argument(flag, type=kind, default=default, help=text)


def main(args: argparse.Namespace) -> None:
    from benchmarks.failover import machine

    res = run(args)
    print(
        f"{res['schedules']} schedules ({res['schedules'] - res['n_cron']} every"
        f" {res['interval']} s + {res['n_cron']} crontab), {res['due_per_s']} ticks/s due;"
        f" {res['runners']} runners, settings {res['settings']}, pooler {res['pooler']};"
        f" library {res['library']}"
    )
    _failover_report.print_report(res)
    print(
        machine(res["db_version"]) + f", load average before and after each trial"
        f" {[tuple(round(x, 2) for x in la) for la in res['loadavg']]}"
    )
    print("RESULT " + json.dumps(res, separators=(",", ":"), default=str))
