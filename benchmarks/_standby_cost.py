"""What a beat standby costs while it stands by, for ``benchmarks.failover --schedules``.

Read from outside the processes: CPU (utime + stime, ``/proc/<pid>/stat``) per minute, RSS
and peak RSS (VmRSS, VmHWM), the CPU of the PostgreSQL backends serving the process (told
by the client ports of its sockets; none behind a pooler), and database-wide
``pg_stat_database`` counters. Those counters are flushed by each backend about once a
second (an idle one within 10 s) and count every session, so a standby's share is
estimated as (window with the standbys - window with the leader alone) / standbys; as the
leader's own reads drift (its ledger grows), ``rows_read_outside_ledger`` leaves out the
reads of the ledger's table and indexes, which only a leader reads.
pg_stat_statements would not help: it is not loaded on this server, nor per backend.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from benchmarks.beat import cpu_seconds
from benchmarks.failover import Child

DB_COUNTERS = ("xact_commit", "tup_returned", "tup_fetched", "blks_hit", "blks_read")
#: Reads by relation (name, its table): rows a table's sequential scans read, index entries
#: an index's scans (plain and bitmap) returned.
TABLE_SQL = (
    "SELECT 'seq ' || relname, relname, seq_scan, seq_tup_read FROM pg_stat_user_tables"
    " UNION ALL SELECT 'idx ' || indexrelname, relname, idx_scan, idx_tup_read"
    " FROM pg_stat_user_indexes"
)
#: Only a leader reads the ledger: its reads are left out of a standby's share.
LEDGER = "cluster_singletons_run"
TOP_TABLES = 5


def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def db_counters() -> dict[str, Any]:
    """``pg_stat_database`` counters of the bench database, the reads of each table and
    index (``TABLE_SQL``: name -> (table, scans, rows)), and when they were read."""
    row = query(
        f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database WHERE datname = current_database()"
    )[0]
    return {
        "t": time.time(),
        **dict(zip(DB_COUNTERS, map(float, row), strict=True)),
        "tables": {name: counts for name, *counts in query(TABLE_SQL)},
    }


def rates(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per second from ``a`` to ``b``; ``rows_read_outside_ledger``: rows and index entries
    read in user relations other than the ledger's; ``tables``: the ``TOP_TABLES`` most read
    relations."""
    dt = b["t"] - a["t"]
    out: dict[str, Any] = {k: round((b[k] - a[k]) / dt, 1) for k in DB_COUNTERS}
    out["rows_read"] = round(out["tup_returned"] + out["tup_fetched"], 1)
    tables = {}
    for name, (table, scans, rows) in b["tables"].items():
        _, scans0, rows0 = a["tables"].get(name, (table, 0, 0))
        tables[name] = {"scans": (scans - scans0) / dt, "rows": (rows - rows0) / dt, "t": table}
    outside = sum(v["rows"] for v in tables.values() if v["t"] != LEDGER)
    out["rows_read_outside_ledger"] = round(outside, 1)
    read = sorted(tables, key=lambda n: -tables[n]["rows"])[:TOP_TABLES]
    out["tables"] = {n: {k: round(tables[n][k], 1) for k in ("scans", "rows")} for n in read}
    return out


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of ``pid``, MB."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def backends_of(pid: int) -> list[int]:
    """PostgreSQL backend pids serving ``pid``'s TCP connections (by client port)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    rows = query("SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database()")
    return [backend for backend, port in rows if port in ports]


def measure(standbys: dict[int, Child], window: float, alone: dict[str, float]) -> dict[str, Any]:
    """Sleep ``window`` s measuring ``standbys`` (by runner id); ``alone`` = ``rates`` of a
    window with the leader alone."""
    backends = {c.pid: backends_of(c.pid) for c in standbys.values()}
    cpu0 = {c.pid: cpu_seconds(c.pid) for c in standbys.values()}
    bcpu0 = {b: cpu_seconds(b) for bs in backends.values() for b in bs}
    c0, t0 = db_counters(), time.monotonic()
    time.sleep(window)
    c1, took = db_counters(), time.monotonic() - t0
    per: list[dict[str, Any]] = []
    for runner, child in standbys.items():
        used = [
            (cpu_seconds(b) or 0) - bcpu0[b]
            for b in backends[child.pid]
            if bcpu0.get(b) is not None and cpu_seconds(b) is not None
        ]
        per.append(
            {
                "runner": runner,
                "cpu_s_per_min": round(
                    ((cpu_seconds(child.pid) or 0) - (cpu0[child.pid] or 0)) / took * 60, 2
                ),
                **{k.lower(): v for k, v in memory_mb(child.pid).items()},
                "pg_backends": len(backends[child.pid]),
                "pg_backend_cpu_s_per_min": round(sum(used) / took * 60, 2) if used else None,
            }
        )
    both = rates(c0, c1)
    n = len(standbys)
    return {
        "window_s": round(took, 1),
        "per_standby": per,
        "db_alone_per_s": alone,
        "db_with_standbys_per_s": both,
        "db_per_standby_per_s": {
            k: round((both[k] - alone[k]) / n, 1)
            for k in ("xact_commit", "rows_read", "rows_read_outside_ledger", "blks_hit")
        },
    }
