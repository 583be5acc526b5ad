"""PostgreSQL liveness: a dedicated session that holds the runner's advisory lock.

While the process lives, its session holds ``pg_advisory_lock(namespace, runner id)``.
When the process dies the server drops the session and the lock with it, which lets
standbys take the dead runner's leases before they expire (see ``leases.acquire``).
The same session LISTENs for lease releases so standbys act on a handoff at once.

Behind a transaction-pooling PgBouncer neither a session lock nor LISTEN means anything;
set ``crash_detection='ttl'`` there and leases fall back to expiry.

Statements: ``pg_advisory_lock``, ``LISTEN`` and ``SELECT 1`` on the liveness session,
and ``runner_is_gone``, the SQL condition the lease and membership stores read. Nothing
here writes a table, so nothing needs fencing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from django.db import OperationalError, connections
from django.db.models import BooleanField
from django.db.models.expressions import RawSQL

from cluster_singletons.errors import describe

logger = logging.getLogger("cluster_singletons.runner")

#: Advisory-lock namespace (first key of ``pg_advisory_lock(int, int)``): "CSRL".
LIVENESS_LOCK_NAMESPACE = 0x4353524C & 0x7FFFFFFF
#: PostgreSQL channel on which releases are announced, so standbys act at once.
RELEASE_CHANNEL = "cluster_singletons_release"


def runner_is_gone(runner: str) -> RawSQL:
    """PostgreSQL: true when runner row alias ``runner`` registered a liveness lock that no
    session holds any more, i.e. its process or connection died."""
    return RawSQL(
        f"""({runner}.liveness_lock AND NOT EXISTS (
                SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = %s::oid AND l.objid = {runner}.id::oid))""",
        (LIVENESS_LOCK_NAMESPACE,),
        output_field=BooleanField(),
    )


class Liveness:
    """Owns the liveness session; ``lost`` is set when the session (and the lock) is gone."""

    def __init__(self, *, using: str, runner_id: int, on_release: Callable[[], None]) -> None:
        self._using = using
        self._runner_id = runner_id
        self._on_release = on_release
        self._conn: psycopg.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.lost = threading.Event()

    def start(self) -> None:
        """Open the session, take the lock (never contended: runner ids are unique), LISTEN.

        Failures raise Django's ``OperationalError``, like every other database error the
        runner paces with backoff, not psycopg's own."""
        params = connections[self._using].get_connection_params()
        try:
            conn = psycopg.connect(**params, autocommit=True)
        except psycopg.Error as exc:
            raise OperationalError(describe(exc)) from exc
        try:
            conn.execute(
                "SELECT pg_advisory_lock(%s, %s)", [LIVENESS_LOCK_NAMESPACE, self._runner_id]
            )
            conn.execute(f"LISTEN {RELEASE_CHANNEL}")
        except psycopg.Error as exc:
            conn.close()
            raise OperationalError(describe(exc)) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._thread = threading.Thread(target=self._listen, name="cluster-liveness", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while not self._closing.is_set():
                for _ in conn.notifies(timeout=1.0):
                    self._on_release()
                # Prove the session is still there even when nothing is announced.
                conn.execute("SELECT 1")
        except Exception as exc:
            if not self._closing.is_set():
                logger.warning(
                    "liveness session lost (%s); leases will be stepped down", describe(exc)
                )
        finally:
            self.lost.set()
            self._on_release()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._conn is not None:
            self._conn.close()
