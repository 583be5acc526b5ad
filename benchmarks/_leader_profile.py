"""Where a new beat leader's time goes, from py-spy samples, for ``benchmarks.failover
--schedules N --profile DIR``.

``start`` runs ``py-spy record --idle --threads --format raw`` on each standby (wall-clock
samples, waiting included; py-spy needs a moment to attach, so start it seconds early);
``stop`` ends them with SIGINT (py-spy then writes its file); ``report`` reads the new
leader's file and splits the samples of its engine thread (``lead:beat``, started when the
lease is taken; told by its ``BeatEngine.run`` frame) into phases: each sample goes to the
first phase below one of whose frames is on its stack, so a phase's time includes what it
calls unless an earlier phase claims it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.failover import REPO, Child

RATE = 100
#: The engine thread's samples are told by this frame: py-spy may show a reused thread id
#: under the name of an earlier thread.
ENGINE = "BeatEngine.run ("
FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*?):(?P<line>\d+)\)$")
#: (phase, function name, file name ending); the function "*" matches any in the file.
PHASES = (
    ("read rows: periodic_tasks.rows", "rows", "beat/periodic_tasks.py"),
    ("signature: periodic_tasks.signature", "signature", "beat/periodic_tasks.py"),
    ("operator settings (schedule_records)", "operator_settings", "beat/schedule_records.py"),
    ("build Schedule objects (sources)", "*", "beat/sources.py"),
    ("schedule_records.last_ticks", "last_ticks", "beat/schedule_records.py"),
    ("catalog.apply: resume / next due per entry", "apply", "beat/catalog.py"),
    ("schedule_records.record_keys", "record_keys", "beat/schedule_records.py"),
    ("schedule_records.problems", "problems", "beat/schedule_records.py"),
    ("catalog.notes", "notes", "beat/catalog.py"),
    ("ledger.open_runs", "open_runs", "beat/ledger.py"),
    ("ledger.pending", "pending", "beat/ledger.py"),
    ("republish pending (outbox)", "_republish", "beat/engine.py"),
    ("gc.collect / gc.freeze (engine.run)", "gc", "beat/engine.py"),
    ("sleeping between passes (leadership.sleep)", "sleep", "cluster/leadership.py"),
    ("first passes: record (ledger.record)", "record", "beat/ledger.py"),
    ("first passes: publish (outbox)", "*", "beat/outbox.py"),
    ("first passes: plan / other (step)", "step", "beat/engine.py"),
    ("watcher start", "start", "beat/refresh.py"),
)


@dataclass
class Spy:
    proc: subprocess.Popen[bytes]
    pid: int
    out: Path


def start(standbys: list[Child], folder: str, trial: int) -> list[Spy]:
    exe = str(Path(sys.executable).with_name("py-spy"))
    spies = []
    Path(folder).mkdir(parents=True, exist_ok=True)
    for child in standbys:
        out = Path(folder) / f"trial{trial}-pid{child.pid}.txt"
        cmd = [
            exe,
            "record",
            "--pid",
            str(child.pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--idle",
            "--threads",
            "--nonblocking",
            "--output",
            str(out),
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        spies.append(Spy(proc, child.pid, out))
    return spies


def stop(spies: list[Spy]) -> None:
    for spy in spies:
        if spy.proc.poll() is None:
            os.kill(spy.proc.pid, signal.SIGINT)
    for spy in spies:
        try:
            spy.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(spy.proc.pid, signal.SIGKILL)
            spy.proc.wait()


def _gc_lines() -> set[int]:
    text = (REPO / "cluster_singletons" / "beat" / "engine.py").read_text().splitlines()
    return {i + 1 for i, line in enumerate(text) if re.search(r"\bgc\.(collect|freeze)\(", line)}


def _frames(stack: str) -> list[tuple[str, str, int]]:
    out = []
    for raw in stack.split(";"):
        if m := FRAME.match(raw):
            out.append((m["func"].rsplit(".", 1)[-1], m["file"], int(m["line"])))
    return out


def _phase(frames: list[tuple[str, str, int]], gc_lines: set[int]) -> str:
    for phase, func, suffix in PHASES:
        for name, file, line in frames:
            if not file.endswith(suffix):
                continue
            if func == "gc" and name == "run" and line in gc_lines:
                return phase
            if func in ("*", name):
                return phase
    return "other (engine thread)"


def report(spies: list[Spy], leader_pid: int, top: int = 15) -> dict[str, Any]:
    """The new leader's engine-thread samples by phase and by innermost frame."""
    spy = next(s for s in spies if s.pid == leader_pid)
    if not spy.out.exists():
        return {"error": f"py-spy wrote no file for pid {leader_pid}"}
    gc_lines = _gc_lines()
    phases: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in spy.out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        _, _, rest = stack.partition(": ")
        _, _, frames = rest.partition(";")
        if ENGINE not in frames or not count.isdigit():
            continue
        n = int(count)
        total += n
        parsed = _frames(frames)
        phases[_phase(parsed, gc_lines)] += n
        leaves[frames.rsplit(";", 1)[-1]] += n
    return {
        "file": str(spy.out),
        "rate_hz": RATE,
        "engine_thread_s": round(total / RATE, 2),
        "phases_s": {k: round(v / RATE, 2) for k, v in phases.most_common()},
        "top_innermost_frames_s": {k: round(v / RATE, 2) for k, v in leaves.most_common(top)},
    }


def print_report(profile: dict[str, Any]) -> None:
    if "error" in profile:
        print(f"    profile: {profile['error']}")
        return
    print(
        f"    profile of the new leader's lead:beat thread ({profile['file']}, py-spy"
        f" {profile['rate_hz']} Hz, wall clock incl. waiting): {profile['engine_thread_s']}"
        " s sampled"
    )
    for name, s in profile["phases_s"].items():
        print(f"      {s:>7.2f} s  {name}")
    print("    innermost frames:")
    for name, s in profile["top_innermost_frames_s"].items():
        print(f"      {s:>7.2f} s  {name}")
