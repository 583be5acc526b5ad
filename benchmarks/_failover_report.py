"""The table and text of a beat failover run (``benchmarks.failover --schedules``)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import _leader_profile

#: (label, key in a trial) summarised over the trials: median and worst.
SUMMARY = (
    ("takeover s", "takeover_s"),
    ("acquired -> first publication s", "acquired_to_first_publish_s"),
    ("kill -> first on-time publication s", "first_on_time_s"),
    ("kill -> last late publication s", "recovered_s"),
    ("ticks > 1 s late in the window", "late_over_1s"),
)


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst over the trials of the headline numbers and the standby costs."""
    out: dict[str, Any] = {}

    def both(key: str, values: list[float]) -> None:
        if values:
            out[key] = {"median": round(statistics.median(values), 3), "max": max(values)}

    for _, key in SUMMARY:
        both(key, [t[key] for t in trials if t.get(key) is not None])
    for q in ("p99", "max"):
        both(f"lateness_{q}_ms", [t["lateness_ms"][q] for t in trials if t["lateness_ms"][q]])
    per = [p for t in trials for p in t["standby"]["per_standby"]]
    for key in ("cpu_s_per_min", "vmrss", "vmhwm", "pg_backend_cpu_s_per_min"):
        both(f"standby_{key}", [p[key] for p in per if p.get(key) is not None])
    for key in ("xact_commit", "rows_read", "rows_read_outside_ledger"):
        both(f"standby_db_{key}_per_s", [t["standby"]["db_per_standby_per_s"][key] for t in trials])
    return out


def cell(v: Any) -> str:
    return "-" if v is None else str(v)


def print_report(res: dict[str, Any]) -> None:
    """Per standby mode: the trials' table, the standbys' costs, the summary; then the
    modes side by side."""
    for mode, part in res["modes"].items():
        print(f"\n== beat_standby = {mode} ==")
        print_mode(part)
    if len(res["modes"]) > 1:
        print("\nside by side (median / worst over the trials):")
        keys = sorted({k for part in res["modes"].values() for k in part["summary"]})
        for key in keys:
            cells = [
                f"{mode}: {v['median']} / {v['max']}" if (v := part["summary"].get(key)) else "-"
                for mode, part in res["modes"].items()
            ]
            print(f"  {key}: " + "; ".join(cells))


def print_mode(res: dict[str, Any]) -> None:
    cols = [
        ("trial", 5),
        ("takeover s", 10),
        ("acq→load s", 10),
        ("acq→pub s", 9),
        ("1st pub s", 9),
        ("1st on-time s", 13),
        ("recovered s", 11),
        ("due", 6),
        (">1s late", 8),
        ("p50 ms", 8),
        ("p99 ms", 8),
        ("max ms", 8),
    ]
    head = " ".join(f"{t:>{w}}" for t, w in cols)
    print(head)
    print("-" * len(head))
    for t in res["trials"]:
        lat = t["lateness_ms"]
        values = [
            t["trial"],
            t["takeover_s"],
            t.get("acquired_to_loaded_s"),
            t.get("acquired_to_first_publish_s"),
            t["first_publish_s"],
            t["first_on_time_s"],
            t["recovered_s"],
            t["due_in_window"],
            t["late_over_1s"],
            lat["p50"],
            lat["p99"],
            lat["max"],
        ]
        print(" ".join(f"{cell(v):>{w}}" for v, (_, w) in zip(values, cols, strict=True)))
    print(
        "(times in s since the SIGKILL; takeover = the lease's acquired_at at the new epoch;"
        " acq→load = acquisition to the log line 'beat leader (epoch E)'; acq→pub ="
        " acquisition to the first publication; 1st on-time = first publication after the"
        " kill with published_at - tick <= 1 s; recovered = the last publication > 1 s late;"
        " due / >1s late / p50 / p99 / max: ticks due in [kill, kill + window), late = > 1 s"
        " or never published; p99 nearest rank)"
    )
    print("\nstandbys while standing by (window B):")
    for t in res["trials"]:
        s = t["standby"]
        per = "; ".join(
            f"runner {p['runner']}: CPU {p['cpu_s_per_min']} s/min, RSS"
            f" {p['vmrss']} MB (peak {p['vmhwm']}), {p['pg_backends']} backends"
            f" CPU {cell(p['pg_backend_cpu_s_per_min'])} s/min"
            for p in s["per_standby"]
        )
        leader = t["leader_memory_mb"]
        print(
            f"  trial {t['trial']}: the leader (for comparison): CPU"
            f" {t['leader_cpu_s_per_min_alone']} s/min alone, RSS {leader['VmRSS']} MB (peak"
            f" {leader['VmHWM']})"
        )
        print(
            f"  trial {t['trial']}: {per}; database per standby (with - without) per s:"
            f" {s['db_per_standby_per_s']}"
        )
        for label, key in (
            ("leader alone", "db_alone_per_s"),
            ("with the standbys", "db_with_standbys_per_s"),
        ):
            db = dict(s[key])
            tables = db.pop("tables")
            print(f"    database per s, {label}: {db}; most read tables: {tables}")
        print(
            f"  trial {t['trial']}: max lateness (ms) per second since the kill:"
            f" {t['max_ms_by_second_since_kill'][:12]} ...; rows by epoch"
            f" {t['rows_by_epoch']}; missing {t['missing']}, unpublished {t['unpublished']},"
            f" skipped {t['skipped']}; ledger rows at kill {t['ledger_rows_at_kill']};"
            f" problems in the new leader's log: {t['new_leader_log_problems'] or 'none'}"
        )
        if "profile" in t:
            _leader_profile.print_report(t["profile"])
    print(f"\nover {len(res['trials'])} trials (median / worst):")
    for key, v in res["summary"].items():
        print(f"  {key}: {v['median']} / {v['max']}")
