"""State ``save()`` latency vs a raw ``UPDATE``, and the load of keeping leadership.

    .venv/bin/python -m benchmarks.state --db sqlite|postgres [--n 2000] [--window 60]

Part 1, in this process (``DJANGO_DEBUG=0``): a registered runner takes a real term of
``singleton:bench``, then one row is written ``n`` times by each case:

- ``fenced``: ``StateStore("singleton:bench", Model, term=term).save()``, what a
  singleton's ``ctx.save`` does (lease check + compare-and-swap in one transaction);
- ``unfenced``: ``state_store("singleton:bench", Model).save()`` (compare-and-swap only);
- ``raw``: ``UPDATE ... SET value=%s, version=version+1 WHERE key=%s`` through the same
  ``django.db.connection`` in autocommit, the JSON serialised beforehand.

Operations are interleaved one by one in a rotating order, so the noise of a shared
machine (fsync latency above all) hits every case alike. Untimed between operations, the
stores are told the row's version (every case moves it on by one) and the lease is renewed
every ``lease_ttl / 5``. ops/s = operations / sum of their latencies (one thread);
cpu = this thread's CPU time per operation; stmts/op = statements sent, BEGIN and COMMIT
included, as Django logs them. Target: fenced p50 <= 2x raw p50 on
PostgreSQL.

Part 2: R ``runcluster`` processes (default settings, ``CLUSTER_DEMO_SINGLETONS=many``,
each declaring the same M idle singletons, spread over the runners by placement) run
under ``benchmarks._counted_runcluster``, which counts on the client, exactly and
timestamped, each runner's statements, transactions and rows written. Once every lease is
held and no runner is above its fair share (or after ``--settle-timeout``), the load is
measured over ``--window`` seconds as least-squares slopes of the totals read every
second (renewals come in bursts, which end-minus-start would count by whole bursts). On
PostgreSQL the lease rows updated are cross-checked with ``pg_stat_user_tables``, sampled
the same way. The server's transaction counters are not used: a session that only reads
can leave its counts unflushed for a minute or more, which makes windowed rates wrong.
After the window one runner is stopped (SIGTERM) and one started again, each timed to an
even spread (``leave_and_join``): how fast placement settles when a runner joins.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from pydantic import BaseModel, Field

from benchmarks.failover import PG_SERVER, REPO, Child, Procs, machine, wait_for
from cluster_singletons.conf import ClusterSettings

PG_DB = "cluster_singletons_statebench"
KEY = "singleton:bench"
TARGET_RATIO = 2.0
RAW_SQL = "UPDATE cluster_singletons_staterecord SET value=%s, version=version+1 WHERE key=%s"
CASES = ("raw", "fenced", "unfenced")
WRITE_VERBS = ("stmt UPDATE", "stmt INSERT", "stmt DELETE")
PG_LEASE_UPDATES = (
    "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'cluster_singletons_lease'"
)


class Bench(BaseModel):
    """A small singleton state: a few fields, ~100 bytes of JSON."""

    cursor: int = 0
    processed: int = 0
    last_run: str = ""
    rate: float = 0.0
    tags: list[str] = Field(default_factory=list)


def pg_admin(sql: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(sql)


def setup(db: str, tmp: Path, pg_db: str) -> None:
    """Point this process (and the children it starts) at a fresh database of our own."""
    for var in ("CLUSTER_SINGLETONS_JSON", "CLUSTER_DEMO_SINGLETONS", "DATABASE_URL"):
        os.environ.pop(var, None)
    os.environ.update(
        CLUSTER_VAR_DIR=str(tmp),
        DJANGO_DEBUG="0",
        PYTHONUNBUFFERED="1",
        DJANGO_SETTINGS_MODULE="project.settings",
    )
    if db == "postgres":
        pg_admin(f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")
        pg_admin(f"CREATE DATABASE {pg_db}")
        os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{pg_db}"
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def bench_save(n: int, warmup: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from cluster_singletons.cluster import leases, membership
    from cluster_singletons.conf import get_settings
    from cluster_singletons.singletons.state import StateStore, state_store

    ttl = get_settings().lease_ttl
    rid = membership.register(host="bench", pid=os.getpid(), kind="runcluster", using="default")
    leases.ensure([KEY], using="default")
    term = leases.acquire(KEY, rid, ttl=ttl, using="default")
    assert term is not None
    stores = [StateStore(KEY, Bench, term=term), state_store(KEY, Bench)]
    value = Bench(
        cursor=7, processed=123_456, last_run="2025-01-01T00:00:00Z", rate=0.25, tags=["a", "b"]
    )
    text = value.model_dump_json()

    def raw() -> None:
        with connection.cursor() as cursor:
            cursor.execute(RAW_SQL, [text, KEY])

    ops = {
        "raw": raw,
        "fenced": lambda: stores[0].save(value),
        "unfenced": lambda: stores[1].save(value),
    }
    stores[1].save(value)  # creates the row at version 1
    version, renew_at = 1, 0.0
    wall: dict[str, list[int]] = {case: [] for case in CASES}
    cpu: dict[str, list[int]] = {case: [] for case in CASES}

    def run(rounds: int, record: bool) -> None:
        nonlocal version, renew_at
        for i in range(rounds):
            if time.monotonic() >= renew_at:  # untimed; well inside the lease TTL
                assert leases.renew(rid, [term], ttl=ttl, using="default") == {KEY}
                renew_at = time.monotonic() + ttl / 5
            for case in CASES[i % 3 :] + CASES[: i % 3]:
                for store in stores:  # every case moves the row on by one version
                    store.version = version
                c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                ops[case]()
                t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
                version += 1
                if record:
                    wall[case].append(t1 - t0)
                    cpu[case].append(c1 - c0)

    run(warmup, record=False)
    sent: dict[str, list[str]] = {}
    for case in CASES:  # untimed: the statements (round trips) each operation sends
        with CaptureQueriesContext(connection) as captured:
            for store in stores:
                store.version = version
            ops[case]()
        version += 1
        sent[case] = [q["sql"].split(None, 1)[0].upper() for q in captured.captured_queries]
    gc.collect()
    run(n, record=True)
    leases.release(rid, using="default")
    membership.deregister(rid, using="default")
    result = {}
    for case, ns in wall.items():
        s = sorted(ns)
        result[case] = {
            "n": len(s),
            "p50_us": round(statistics.median(s) / 1000, 1),
            "p99_us": round(s[math.ceil(0.99 * len(s)) - 1] / 1000, 1),  # nearest rank
            "ops_s": int(len(s) / (sum(s) / 1e9)),
            "client_cpu_p50_us": round(statistics.median(cpu[case]) / 1000, 1),
            "statements_per_op": len(sent[case]),
            "statements": sent[case],
        }
    for case in CASES:
        result[case]["ratio_p50"] = round(result[case]["p50_us"] / result["raw"]["p50_us"], 2)
    return result


# -- renewal load ----------------------------------------------------------------------------


def distribution(prefix: str) -> dict[int, int]:
    """Unexpired leases named ``prefix...`` per holder."""
    from django.db.models import Count
    from django.db.models.functions import Now

    from cluster_singletons.models import Lease

    rows = (
        Lease.objects.filter(name__startswith=prefix, holder__isnull=False, expires_at__gt=Now())
        .values_list("holder")
        .annotate(n=Count("name"))
    )
    return dict(rows)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points: a rate that a burst at either end of the
    window does not skew."""
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    return sum((t - mt) * (v - mv) for t, v in points) / sum((t - mt) ** 2 for t, _ in points)


def read_counts(files: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in files]


def bench_renewal(
    procs: Procs,
    runners_n: int,
    singletons: int,
    window: float,
    settle_timeout: float,
    pg: psycopg.Connection[Any] | None,
) -> dict[str, Any]:
    from cluster_singletons.models import Lease, Runner

    env = {**os.environ, "CLUSTER_DEMO_SINGLETONS": "many", "CLUSTER_DEMO_MANY": str(singletons)}
    tag = f"{runners_n}x{singletons}"
    files = [procs.tmp / f"count-{tag}-{i}.json" for i in range(runners_n)]
    cmd = [sys.executable, "-m", "benchmarks._counted_runcluster"]
    kids = [procs.start(f"runner-{tag}", [*cmd, str(f)], env, REPO) for f in files]
    t0 = time.monotonic()
    try:
        wait_for(f"{tag}: runners to start", lambda: all(f.exists() for f in files), 120, 0.2)

        def settled() -> bool:
            if any(not k.alive for k in kids):
                raise RuntimeError(f"{tag}: a runner exited; see {procs.tmp}")
            print(
                f"  {tag} {time.monotonic() - t0:5.0f}s held per runner:"
                f" {sorted(distribution('singleton:many-').values())}",
                file=sys.stderr,
                end="\r",
                flush=True,
            )
            return spread(runners_n, singletons)

        try:
            wait_for(f"{tag}: leases held and spread", settled, settle_timeout, 1.0)
            settle_s: float | None = round(time.monotonic() - t0, 1)
        except TimeoutError:
            settle_s = None  # measured anyway; "held_per_runner" shows how far it got
        print(file=sys.stderr)
        epoch_sum = sum(Lease.objects.values_list("epoch", flat=True))
        time.sleep(6)  # two renewal intervals, so acquisition bursts are over
        points: list[tuple[float, float]] = []  # pg_stat lease rows updated
        counted: list[list[dict[str, Any]]] = []  # each runner's totals, every second
        end_at = time.monotonic() + window
        while True:
            counted.append(read_counts(files))
            if pg is not None:
                points.append((time.monotonic(), float(pg.execute(PG_LEASE_UPDATES).fetchone()[0])))
            if time.monotonic() >= end_at:
                break
            time.sleep(1.0)
        held = distribution("singleton:many-")
        acquisitions = sum(Lease.objects.values_list("epoch", flat=True)) - epoch_sum
        leave_s, join_s = leave_and_join(procs, kids, cmd, env, tag, singletons, settle_timeout)
    finally:
        for kid in kids:
            kid.stop(15)
    Lease.objects.all().delete()
    Runner.objects.all().delete()
    rate: dict[str, float] = {}  # slopes, not end-minus-start: renewals come in bursts
    for i in range(runners_n):
        for key in counted[-1][i]["counts"]:
            series = [(c[i]["t"], float(c[i]["counts"].get(key, 0))) for c in counted]
            rate[key] = rate.get(key, 0) + slope(series)

    def total(*prefixes: str) -> float:
        return round(sum(v for k, v in rate.items() if k.startswith(prefixes)), 2)

    out = {
        "runners": runners_n,
        "singletons": singletons,
        "settle_s": settle_s,
        "leave_s": leave_s,
        "join_s": join_s,
        "held_per_runner": sorted(held.values()),
        "acquisitions": acquisitions,
        "statements_s": total("stmt "),
        "write_statements_s": total(*WRITE_VERBS),
        "select_s": total("stmt SELECT"),
        "liveness_statements_s": total("stmt psycopg"),
        "transactions_s": total("tx ", "stmt psycopg"),
        "lease_rows_written_s": total("rows UPDATE cluster_singletons_lease"),
        "runner_rows_written_s": total("rows UPDATE cluster_singletons_runner"),
        "counts_s": {k: round(v, 2) for k, v in sorted(rate.items()) if v},
    }
    if pg is not None:
        out["pg_stat_lease_rows_updated_s"] = round(slope(points), 1)
    return out


def spread(runners_n: int, singletons: int) -> bool:
    """Every lease held, by ``runners_n`` runners, none above its fair share."""
    held = distribution("singleton:many-")
    return (
        sum(held.values()) == singletons
        and len(held) == runners_n
        and max(held.values()) <= math.ceil(singletons / runners_n)
    )


def leave_and_join(
    procs: Procs,
    kids: list[Child],
    cmd: list[str],
    env: dict[str, str],
    tag: str,
    singletons: int,
    timeout: float,
) -> tuple[float | None, float | None]:
    """After the window: SIGTERM one runner and time how long the others take to even out
    (from its exit); then start a runner again and time how long placement takes to even
    out with it (from its registration). Polled every 0.1 s; None = not within ``timeout``."""
    from cluster_singletons.models import Runner

    runners_n = len(kids)
    kids[-1].stop(15)
    left_at = time.monotonic()
    try:
        wait_for(
            f"{tag}: spread after a runner left",
            lambda: spread(runners_n - 1, singletons),
            timeout,
            0.1,
        )
        leave_s: float | None = round(time.monotonic() - left_at, 1)
    except TimeoutError:
        leave_s = None
    kids.append(
        procs.start(
            f"runner-{tag}-join", [*cmd, str(procs.tmp / f"count-{tag}-join.json")], env, REPO
        )
    )
    wait_for(
        f"{tag}: the joining runner to register",
        lambda: Runner.objects.filter(stopping=False).count() == runners_n,
        120,
        0.02,
    )
    joined_at = time.monotonic()
    try:
        wait_for(
            f"{tag}: spread after a runner joined",
            lambda: spread(runners_n, singletons),
            timeout,
            0.1,
        )
        join_s: float | None = round(time.monotonic() - joined_at, 1)
    except TimeoutError:
        join_s = None
    return leave_s, join_s


# -- report ------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]) -> None:
    """Print ``rows`` under ``cols`` of (title, key, width); a missing value shows as '-'."""
    print(" ".join(f"{title:>{w}}" for title, _, w in cols))
    print("-" * sum(w + 1 for *_, w in cols))
    for r in rows:
        print(" ".join(f"{'-' if r.get(key) is None else r[key]:>{w}}" for _, key, w in cols))


def print_report(db: str, save: dict[str, Any], renewal: list[dict[str, Any]]) -> None:
    table(
        [{"case": case, **r} for case, r in save.items()],
        [
            ("save case", "case", 9),
            ("n", "n", 6),
            ("p50 us", "p50_us", 9),
            ("p99 us", "p99_us", 9),
            ("ops/s", "ops_s", 7),
            ("cpu p50 us", "client_cpu_p50_us", 10),
            ("stmts/op", "statements_per_op", 8),
            ("p50 / raw p50", "ratio_p50", 13),
        ],
    )
    if db == "postgres":
        met = save["fenced"]["ratio_p50"] <= TARGET_RATIO
        print(f"target fenced p50 <= {TARGET_RATIO}x raw p50: {'met' if met else 'MISSED'}")
    print(
        "(p99 nearest rank; cpu = client CPU per operation; stmts/op = statements sent per"
        " operation, BEGIN and COMMIT included: "
        + "; ".join(f"{case} {' '.join(r['statements'])}" for case, r in save.items())
        + ")"
    )
    if not renewal:
        return
    print()
    table(
        renewal,
        [
            ("runners", "runners", 7),
            ("singletons", "singletons", 10),
            ("settle s", "settle_s", 8),
            ("leave s", "leave_s", 7),
            ("join s", "join_s", 6),
            ("stmts/s", "statements_s", 8),
            ("writes/s", "write_statements_s", 8),
            ("SELECT/s", "select_s", 8),
            ("liveness/s", "liveness_statements_s", 10),
            ("tx/s", "transactions_s", 7),
            ("lease rows/s", "lease_rows_written_s", 12),
            ("pg_stat", "pg_stat_lease_rows_updated_s", 7),
            ("runner rows/s", "runner_rows_written_s", 13),
            ("acquired", "acquisitions", 8),
        ],
    )
    print(
        "(per second over the window, all runners together; stmts = every statement, liveness"
        " sessions' included; writes = UPDATE/INSERT/DELETE statements; liveness = the"
        " PostgreSQL liveness sessions' statements; tx = transactions (autocommit statements"
        " + commits); lease rows = lease rows the runners' UPDATEs touched, pg_stat = the same"
        " from pg_stat_user_tables; acquired = lease epochs raised from settling to the end"
        " of the window; settle = from starting the runners together to an even spread, leave ="
        " from one runner's exit after the window (SIGTERM) to an even spread over the others,"
        " join = from a runner's registration after that to an even spread with it; '-' = not"
        " within --settle-timeout)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], required=True)
    parser.add_argument("--n", type=int, default=2000, help="timed operations per save case")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--window", type=float, default=60.0, help="renewal window, seconds")
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    parser.add_argument(
        "--shapes",
        default="4x1000,4x100,2x1000,2x100",
        help="renewal cases RUNNERSxSINGLETONS, comma-separated ('' skips)",
    )
    parser.add_argument(
        "--pg-database", default=PG_DB, help="the PostgreSQL database to create, use and drop"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    tmp = Path(tempfile.mkdtemp(prefix="cs-statebench-"))
    procs = Procs(tmp)
    pg = None
    try:
        setup(args.db, tmp, args.pg_database)
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SHOW server_version" if args.db == "postgres" else "SELECT sqlite_version()"
            )
            db_version = f"{connection.display_name} {cursor.fetchone()[0]}"
        save = bench_save(args.n, args.warmup)
        if args.db == "postgres":
            pg = psycopg.connect(f"{PG_SERVER}/{args.pg_database}", autocommit=True)
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",") if s]
        renewal = [
            bench_renewal(procs, r, m, args.window, args.settle_timeout, pg) for r, m in shapes
        ]
    finally:
        procs.stop_all()
        if pg is not None:
            pg.close()
        if args.db == "postgres":
            from django.db import connections

            connections.close_all()
            pg_admin(f"DROP DATABASE IF EXISTS {args.pg_database} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(args.db, save, renewal)
    print(machine(db_version))
    result = {
        "db": args.db,
        "save": save,
        "target_ratio_fenced_p50": TARGET_RATIO,
        "renewal": renewal,
        "window_s": args.window,
        "settings": ClusterSettings().model_dump(
            include={"lease_ttl", "renew_interval", "acquire_interval", "crash_detection"}
        ),
    }
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
