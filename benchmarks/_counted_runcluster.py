"""``manage.py runcluster`` with its database traffic counted, for ``benchmarks.state``.

    python -m benchmarks._counted_runcluster COUNT_FILE

The command runs unchanged in this process. Counted, per process:

- every statement Django sends, by verb (an execute wrapper on every connection);
- rows written, by verb and table (the cursor's ``rowcount`` after each write);
- transactions: statements sent in autocommit (each is one) plus commits of ``atomic``
  blocks (``DatabaseWrapper.commit`` is wrapped);
- statements sent on plain psycopg connections (``psycopg.Connection.execute``): on
  PostgreSQL that is the liveness session, each statement its own transaction.

Totals are written with a wall-clock timestamp to ``COUNT_FILE`` (JSON, replaced
atomically) every 0.5 s and at exit.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

WRITE = re.compile(r'\s*(UPDATE|INSERT\s+INTO|DELETE\s+FROM)\s+"?(\w+)"?', re.I)


def main() -> None:
    out = Path(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django
    import psycopg
    from django.core.management import call_command
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.signals import connection_created

    django.setup()
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def add(key: str, n: int = 1) -> None:
        with lock:
            counts[key] += n

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        add("stmt " + (sql.split(None, 1) or ["?"])[0].upper())
        if not context["connection"].in_atomic_block and not sql.startswith("BEGIN"):
            add("tx autocommit")  # SQLite's BEGIN runs just before the block counts as open
        if match := WRITE.match(sql):
            verb = match[1].split()[0].upper()
            add(f"rows {verb} {match[2]}", max(0, context["cursor"].rowcount))
        return result

    def wrap(sender: Any, connection: Any, **kwargs: Any) -> None:
        if count not in connection.execute_wrappers:  # reconnects fire the signal again
            connection.execute_wrappers.append(count)

    connection_created.connect(wrap, weak=False)
    commit, execute = BaseDatabaseWrapper.commit, psycopg.Connection.execute

    def counted_commit(self: Any) -> None:
        commit(self)
        add("tx atomic")

    def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        add("stmt psycopg")
        return execute(self, *args, **kwargs)

    BaseDatabaseWrapper.commit = counted_commit  # type: ignore[method-assign]
    psycopg.Connection.execute = counted_execute  # type: ignore[method-assign]

    def dump() -> None:
        with lock:
            data = {"t": time.time(), "counts": dict(counts)}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, out)

    def loop() -> None:
        while True:
            dump()
            time.sleep(0.5)

    threading.Thread(target=loop, name="bench-count", daemon=True).start()
    try:
        call_command("runcluster")
    finally:
        dump()


if __name__ == "__main__":
    main()
