"""Leader takeover time: our ``runcluster`` leases (default settings) vs celery-redbeat's lock.

    .venv/bin/python -m benchmarks.failover --db sqlite|postgres --trials N [--pooler pgbouncer]
    .venv/bin/python -m benchmarks.failover --db postgres --schedules N [--trials K] [...]

With ``--schedules N``: the beat's failover end to end with N schedules (kill to the first
on-time tick, ticks published late, what a standby costs); see ``benchmarks._beat_failover``.

Ours: three ``runcluster`` processes on a fresh database. Each trial waits until ``beat``
has a holder, waits a random 1 s + U(0, renew_interval) so the signal lands at a random
point of the renewal cycle, signals the holder (SIGKILL, SIGSTOP or SIGTERM; cases are
interleaved) and measures, by polling the database every 10 ms from this process, the
time from just before ``os.kill`` until ``beat`` is held by another runner.

Redbeat: two ``celery beat -S redbeat.RedBeatScheduler`` processes; SIGKILL the lock holder
and poll the Redis lock key (``<redbeat_key_prefix>:lock``, value = the holder's token)
until a different token appears. Ticks missed are counted from the beat logs.

Every process started here is stopped by PID in a ``finally``; temp dirs, the bench
PostgreSQL database and the Redis keys of the run are removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from cluster_singletons.conf import ClusterSettings
from project.demo.pgbouncer import PgBouncer

REPO = Path(__file__).resolve().parent.parent
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
PG_BENCH_DB = "cluster_singletons_bench"
REDIS_URL = "redis://127.0.0.1:6379/15"
POLL = 0.01
SETTINGS = ClusterSettings()  # defaults: the runners get no CLUSTER_SINGLETONS_JSON
HOLDER_SQL = (
    "SELECT l.holder_id, r.pid FROM cluster_singletons_lease l "
    "LEFT JOIN cluster_singletons_runner r ON r.id = l.holder_id WHERE l.name = 'beat'"
)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = POLL) -> Any:
    """Poll ``check`` until it returns something truthy; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Child:
    """A started process and the file its stdout and stderr go to."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self, start: int = 0) -> str:
        return self.log.read_text(errors="replace")[start:]

    def stop(self, grace: float = 5.0) -> None:
        """SIGCONT + SIGTERM, then SIGKILL after ``grace`` seconds; always reaped."""
        if not self.alive:
            return
        try:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                os.kill(self.pid, sig)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Procs:
    """Every child process of the run, each logging to its own file in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.all = tmp, []

    def start(self, tag: str, cmd: list[str], env: dict[str, str], cwd: Path) -> Child:
        log = self.tmp / f"{tag}-{len(self.all) + 1}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.all.append(Child(proc, log))
        return self.all[-1]

    def stop_all(self) -> None:
        for child in self.all:
            child.stop()


def summary(times: list[float], attempts: int) -> dict[str, Any]:
    """n measured of ``attempts``; median, nearest-rank p95, min, max (s, 3 decimals)."""
    if not times:
        return {"n": 0, "attempts": attempts, "median": None, "p95": None, "min": None, "max": None}
    s = sorted(times)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    stats = {"median": statistics.median(s), "p95": p95, "min": s[0], "max": s[-1]}
    return {"n": len(s), "attempts": attempts, **{k: round(v, 3) for k, v in stats.items()}}


# -- our runners ---------------------------------------------------------------------------


class Database:
    """A fresh bench database plus a plain connection (autocommit) to watch it."""

    def __init__(self, kind: str, tmp: Path, pooler: str | None = None) -> None:
        self.kind = kind
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"CLUSTER_SINGLETONS_JSON", "DATABASE_URL"}
        }
        self.env.update(CLUSTER_VAR_DIR=str(tmp), PYTHONUNBUFFERED="1")
        self.bouncer: PgBouncer | None = None
        if kind == "postgres":
            drop_pg_db(create=True)
            self.env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{PG_BENCH_DB}"
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=self.env, check=True
        )
        if pooler == "pgbouncer":  # the runners connect through it; this process directly
            self.bouncer = PgBouncer(("127.0.0.1", 5432), user="postgres")
            self.bouncer.start()
            self.env["DATABASE_URL"] = (
                f"postgres://postgres@127.0.0.1:{self.bouncer.port}/{PG_BENCH_DB}"
            )
        if kind == "postgres":
            self.conn: Any = psycopg.connect(f"{PG_SERVER}/{PG_BENCH_DB}", autocommit=True)
            self.version = "PostgreSQL " + self.one("SHOW server_version")[0]
        else:
            self.conn = sqlite3.connect(tmp / "db.sqlite3", isolation_level=None, timeout=1)
            self.version = "SQLite " + sqlite3.sqlite_version

    def one(self, sql: str) -> tuple[Any, ...] | None:
        return self.conn.execute(sql).fetchone()

    def holder(self) -> tuple[int, int] | None:
        """(holder runner id, its pid) of ``beat``, or None while nobody holds it."""
        row = self.one(HOLDER_SQL)
        return (row[0], row[1]) if row and row[0] is not None else None

    def stuck_writer(self) -> bool:
        """Whether some session sits inside an open write transaction right now."""
        if self.kind == "postgres":
            row = self.one(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'"
            )
            return bool(row and row[0])
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:  # "database is locked"
            return True
        finally:
            self.conn.execute("PRAGMA busy_timeout = 1000")


def drop_pg_db(create: bool = False) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {PG_BENCH_DB} WITH (FORCE)")
        if create:
            admin.execute(f"CREATE DATABASE {PG_BENCH_DB}")


class Cluster:
    """Three live ``runcluster`` processes; replaces the ones that exit."""

    SIZE = 3

    def __init__(self, procs: Procs, db: Database) -> None:
        self.procs, self.db, self.live = procs, db, []

    def fill(self) -> None:
        self.live = [p for p in self.live if p.alive]
        while len(self.live) < self.SIZE:
            cmd = [sys.executable, "manage.py", "runcluster"]
            self.live.append(self.procs.start("runner", cmd, self.db.env, REPO))
        for p in self.live:
            wait_for(
                f"runner pid {p.pid} to register",
                lambda p=p: re.search(r"runner \d+ registered", p.text()),
                60,
            )

    def leader(self) -> tuple[int, Child]:
        runner_id, pid = wait_for("'beat' to have a holder", self.db.holder, 60)
        by_pid = {p.pid: p for p in self.live}
        if pid not in by_pid:
            raise RuntimeError(f"'beat' is held by pid {pid}, not one of ours {sorted(by_pid)}")
        return runner_id, by_pid[pid]

    def takeover(self, old_id: int, t0: float, timeout: float) -> float | None:
        """Seconds from ``t0`` until another runner holds ``beat``; None after ``timeout``."""
        while time.monotonic() - t0 < timeout:
            held = self.db.holder()
            now = time.monotonic()
            if held and held[0] != old_id:
                return now - t0
            time.sleep(POLL)
        return None


def run_ours(cluster: Cluster, trials: int, rng: random.Random) -> dict[str, Any]:
    s = SETTINGS
    times: dict[str, list[float]] = {
        "sigkill": [],
        "sigstop": [],
        "sigterm": [],
        "sigstop_stepdown": [],
    }
    notes: dict[str, dict[str, int]] = {name: {} for name in times}
    attempts = dict.fromkeys(times, 0)

    def note(case: str, what: str) -> None:
        notes[case][what] = notes[case].get(what, 0) + 1

    for i in range(trials):
        for case, sig in (
            ("sigkill", signal.SIGKILL),
            ("sigstop", signal.SIGSTOP),
            ("sigterm", signal.SIGTERM),
        ):
            cluster.fill()
            old_id, proc = cluster.leader()
            time.sleep(1.0 + rng.uniform(0, s.renew_interval))
            if cluster.db.holder() != (old_id, proc.pid):
                raise RuntimeError("leadership moved before the signal was sent")
            t0 = time.monotonic()
            os.kill(proc.pid, sig)
            attempts[case] += 1
            limit = s.lease_ttl + (8 if sig == signal.SIGSTOP else s.renew_interval + 10)
            took = cluster.takeover(old_id, t0, limit)
            print(
                f"  trial {i + 1} {case}: "
                + (f"{took:.3f}s" if took is not None else f"no takeover in {limit:.0f}s"),
                file=sys.stderr,
                flush=True,
            )
            if sig == signal.SIGKILL:
                proc.proc.wait(10)
            elif sig == signal.SIGTERM:
                if (code := proc.proc.wait(s.shutdown_timeout + 10)) != 0:
                    note(case, f"exit code {code}")
            else:
                if took is None:
                    stuck = cluster.db.stuck_writer()
                    note(
                        case,
                        "aborted (stopped inside a write transaction)"
                        if stuck
                        else "aborted (no takeover, no stuck write transaction seen)",
                    )
                mark = len(proc.text())
                t_cont = time.monotonic()
                os.kill(proc.pid, signal.SIGCONT)
                if took is not None:
                    attempts["sigstop_stepdown"] += 1
                    try:
                        wait_for(
                            f"pid {proc.pid} to step down",
                            lambda p=proc, m=mark: "steps down" in p.text(m),
                            30,
                        )
                        times["sigstop_stepdown"].append(time.monotonic() - t_cont)
                    except TimeoutError:
                        note("sigstop_stepdown", "no 'steps down' logged within 30s")
                    if (cluster.db.holder() or (None,))[0] == old_id:
                        note(case, "old leader still holds after SIGCONT")
            if took is not None:
                times[case].append(took)
            elif sig != signal.SIGSTOP:
                note(case, f"no takeover within {limit:.0f}s")
    return {case: {**summary(t, attempts[case]), "notes": notes[case]} for case, t in times.items()}


# -- redbeat -------------------------------------------------------------------------------

SEND_RE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): .*Sending due task", re.M)


def send_times(beat: Child) -> list[datetime]:
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f") for m in SEND_RE.findall(beat.text())]


def run_redbeat_case(
    procs: Procs,
    name: str,
    trials: int,
    cap: float,
    rng: random.Random,
    lock_timeout: int | None,
    max_loop: int | None,
) -> dict[str, Any]:
    """SIGKILL the redbeat lock holder ``trials`` times; stop at the first missed takeover."""
    prefix = f"bench-failover-{os.getpid()}-{name}:"
    lock_key = prefix + ":lock"  # RedBeatConfig: key_prefix + ':lock'
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_REDBEAT_PREFIX": prefix}
    for var, value in (
        ("BENCH_REDBEAT_LOCK_TIMEOUT", lock_timeout),
        ("BENCH_REDBEAT_MAX_LOOP", max_loop),
    ):
        if value is not None:
            env[var] = str(value)
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.redbeat_app",
        "beat",
        "-S",
        "redbeat.RedBeatScheduler",
        "--loglevel",
        "INFO",
    ]
    r = redis.Redis.from_url(REDIS_URL)
    mine: list[Child] = []

    def start_beat() -> Child:
        beat = procs.start(f"redbeat-{name}", cmd, env, procs.tmp)
        mine.append(beat)
        wait_for(f"beat pid {beat.pid} to start", lambda: "beat: Starting" in beat.text(), 60)
        return beat

    result: dict[str, Any] = {"lock_timeout_setting": lock_timeout, "max_loop_setting": max_loop}
    times: list[float] = []
    missed: list[int] = []
    kills = 0
    try:
        holder = start_beat()
        wait_for("the first beat to take the lock", lambda: "Acquired lock" in holder.text(), 30)
        result["lock_ttl_observed_s"] = round(r.pttl(lock_key) / 1000, 1)
        standby = start_beat()
        for i in range(trials):
            time.sleep(1.0 + rng.uniform(0, 1.0))
            token = r.get(lock_key)
            t0 = time.monotonic()
            os.kill(holder.pid, signal.SIGKILL)
            kills += 1
            holder.proc.wait(10)
            took = None
            while time.monotonic() - t0 < cap:
                value = r.get(lock_key)
                if value is not None and value != token:
                    took = time.monotonic() - t0
                    break
                time.sleep(POLL)
            print(
                f"  redbeat {name} trial {i + 1}: "
                + (f"{took:.3f}s" if took is not None else f"no takeover in {cap:.0f}s"),
                file=sys.stderr,
                flush=True,
            )
            if took is None:
                result["no_takeover_within_s"] = cap
                break
            times.append(took)
            wait_for("the standby to log its first send", lambda b=standby: send_times(b), 10)
            if sent_before := send_times(holder):
                gap = (send_times(standby)[0] - sent_before[-1]).total_seconds()
                missed.append(max(0, math.floor(gap - 0.05)))  # 1 s slots inside the gap
            holder, standby = standby, start_beat()
    finally:
        for beat in mine:
            beat.stop()
        for pattern in (f"{prefix}*", f"_kombu.*{prefix}*"):
            for key in r.scan_iter(match=pattern):
                r.delete(key)
    return {**summary(times, kills), **result, "missed_ticks": missed}


# -- report --------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(rows: list[tuple[str, dict[str, Any], str]]) -> None:
    head = f"{'case':<34} {'trials':>7} {'median s':>9} {'p95 s':>9} {'min':>9} {'max':>9}  notes"
    print(head)
    print("-" * len(head))
    for label, r, extra in rows:
        trials = f"{r['n']}/{r['attempts']}"
        print(
            f"{label:<34} {trials:>7} {fmt(r['median']):>9} {fmt(r['p95']):>9} "
            f"{fmt(r['min']):>9} {fmt(r['max']):>9}  {extra}"
        )


def machine(db_version: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    return (
        f"machine: nproc={len(os.sched_getaffinity(0))}, cpu={model[1] if model else '?'}, "
        f"python={platform.python_version()}, db={db_version}"
    )


def main() -> None:
    from benchmarks import _beat_failover  # it builds on this module and benchmarks.beat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], required=True)
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials per signal case (default 10); with --schedules, kills (default 3)",
    )
    parser.add_argument("--redbeat-trials", type=int, default=5)
    parser.add_argument(
        "--redbeat-cap",
        type=float,
        default=120.0,
        help="seconds to wait for a redbeat takeover before giving up",
    )
    parser.add_argument("--skip-redbeat", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="seed of the signal delays")
    parser.add_argument(
        "--pooler",
        choices=["pgbouncer"],
        default=None,
        help="runners connect through PgBouncer in transaction mode (postgres)",
    )
    parser.add_argument(
        "--schedules",
        type=int,
        default=None,
        metavar="N",
        help="beat failover end to end at N schedules instead (postgres)",
    )
    _beat_failover.add_arguments(parser)
    args = parser.parse_args()
    if args.pooler and args.db != "postgres":
        parser.error("--pooler needs --db postgres")
    if args.schedules is not None:
        if args.db != "postgres":
            parser.error("--schedules needs --db postgres")
        args.trials = 3 if args.trials is None else args.trials
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        _beat_failover.main(args)
        return
    args.trials = 10 if args.trials is None else args.trials
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="cs-failover-"))
    procs = Procs(tmp)
    db: Database | None = None
    try:
        db = Database(args.db, tmp, args.pooler)
        ours = run_ours(Cluster(procs, db), args.trials, rng)
        redbeat: dict[str, Any] = {}
        if not args.skip_redbeat:
            redbeat["tuned"] = run_redbeat_case(
                procs,
                "tuned",
                args.redbeat_trials,
                args.redbeat_cap,
                rng,
                lock_timeout=10,
                max_loop=1,
            )
            redbeat["default"] = run_redbeat_case(
                procs, "default", 1, args.redbeat_cap, rng, lock_timeout=None, max_loop=None
            )
        db_version = db.version
    finally:
        procs.stop_all()
        if db is not None and db.bouncer is not None:
            db.bouncer.close()
        if args.db == "postgres":
            drop_pg_db()
        shutil.rmtree(tmp, ignore_errors=True)

    where = args.db + (f"+{args.pooler}" if args.pooler else "")
    rows = [
        (f"ours {where} {case}", r, "; ".join(f"{k}: {v}" for k, v in r["notes"].items()))
        for case, r in ours.items()
    ]
    for name, r in redbeat.items():
        extra = f"lock ttl {r['lock_ttl_observed_s']}s"
        if "no_takeover_within_s" in r:
            extra = f"> {r['no_takeover_within_s']:.0f} s, no takeover; {extra}"
        if r["missed_ticks"]:
            extra += f"; 1s ticks missed per takeover: {r['missed_ticks']}"
        rows.append((f"redbeat {name} sigkill", r, extra))
    print_table(rows)
    print(
        "(p95 = nearest rank; times from just before os.kill to the first 10 ms poll that shows"
        " the new holder; sigstop_stepdown = SIGCONT until the old leader logs 'steps down')"
    )
    print(machine(db_version))
    keep = (
        "median",
        "p95",
        "n",
        "attempts",
        "notes",
        "lock_ttl_observed_s",
        "no_takeover_within_s",
        "missed_ticks",
    )

    def pick(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in keep if r.get(k) not in (None, {}, [])}

    result = {
        "db": args.db,
        "pooler": args.pooler,
        "trials": args.trials,
        "cases": {case: pick(r) for case, r in ours.items()},
        "redbeat": {name: pick(r) for name, r in redbeat.items()},
        "settings": SETTINGS.model_dump(
            include={"lease_ttl", "renew_interval", "acquire_interval", "crash_detection"}
        ),
    }
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
