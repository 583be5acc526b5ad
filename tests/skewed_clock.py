"""Test-only: run a Python program whose wall clock is off by a number of seconds.

    python -m tests.skewed_clock SECONDS -m MODULE [ARGS...]
    python -m tests.skewed_clock SECONDS SCRIPT [ARGS...]

Before anything else is imported, ``time.time``, ``time.time_ns`` and
``datetime.datetime.now``/``utcnow`` are made to read ``SECONDS`` ahead of the real clock
(negative: behind), in place, so every module of the program sees the same skewed wall
clock; ``date.today`` follows, since it reads ``time.time``. The monotonic clocks, sleeping
and the C library's clock (which SQLite's ``'now'`` and the PostgreSQL server read) stay
true, as on a host whose wall clock is wrong. (libfaketime skews the process's
``clock_gettime`` instead, which breaks CPython's ``time.sleep`` here.)
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import runpy
import sys
import time
from typing import Any


def skew(seconds: float) -> None:
    """Make this process's wall clock read ``seconds`` off the real one, from now on."""
    real_time, real_time_ns = time.time, time.time_ns
    offset_ns = round(seconds * 1e9)
    delta = datetime.timedelta(seconds=seconds)
    real_now = datetime.datetime.__dict__["now"]
    real_utcnow = datetime.datetime.__dict__["utcnow"]

    def now(cls: type[datetime.datetime], tz: datetime.tzinfo | None = None) -> Any:
        return real_now.__get__(None, cls)(tz) + delta

    def utcnow(cls: type[datetime.datetime]) -> Any:
        return real_utcnow.__get__(None, cls)() + delta

    time.time = lambda: real_time() + seconds
    time.time_ns = lambda: real_time_ns() + offset_ns
    # ``datetime`` is a C type whose attributes cannot be set: write its method table
    # itself, then tell the interpreter the type changed (its method cache).
    methods = gc.get_referents(datetime.datetime.__dict__)[0]
    methods["now"], methods["utcnow"] = classmethod(now), classmethod(utcnow)
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(datetime.datetime))


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m tests.skewed_clock SECONDS (-m MODULE | SCRIPT) [ARGS]")
    skew(float(argv[0]))
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
