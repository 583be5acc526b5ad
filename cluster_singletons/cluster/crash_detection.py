"""PostgreSQL liveness: a dedicated session that holds the runner's advisory lock.

While the process lives, its session holds ``pg_advisory_lock(namespace, runner id)``.
When the process dies the server drops the session and the lock with it, which lets
standbys take the dead runner's leases before they expire (see ``leases.acquire``).
The same session LISTENs for lease releases so standbys act on a handoff at once.

Behind a transaction-pooling PgBouncer neither a session lock nor LISTEN means anything;
set ``crash_detection='ttl'`` there and leases fall back to expiry.

Statements: ``pg_advisory_lock``, ``LISTEN`` and ``SELECT 1`` on the liveness session
(``membership.runner_is_gone`` is the condition the stores read off that lock). Nothing
here writes a table but through ``membership``, so nothing needs fencing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from django.db import OperationalError, connections

from cluster_singletons.cluster import membership
from cluster_singletons.cluster.membership import LIVENESS_LOCK_NAMESPACE
from cluster_singletons.errors import describe

logger = logging.getLogger("cluster_singletons.runner")

#: PostgreSQL channel on which releases are announced, so standbys act at once.
RELEASE_CHANNEL = "cluster_singletons_release"


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


class CrashDetection:
    """One runner's crash detection: its liveness session while it is wanted (PostgreSQL
    with ``crash_detection='auto'``), and when to try again after the session was lost."""

    def __init__(self, *, wanted: bool, using: str, on_release: Callable[[], None]) -> None:
        self.wanted = wanted
        self._using = using
        self._on_release = on_release
        self._session: Liveness | None = None
        #: When to open a lost session again (monotonic; infinity: not needed).
        self.retry = float("inf")

    @property
    def active(self) -> bool:
        """Whether leases may be taken from holders whose liveness lock is gone."""
        return self._session is not None

    @property
    def lost(self) -> bool:
        return self._session is not None and self._session.lost.is_set()

    @property
    def may_lead(self) -> bool:
        """Not wanted, or the session is up."""
        return not self.wanted or self._session is not None

    def due(self, now: float) -> bool:
        return self.wanted and self._session is None and now >= self.retry

    def start(self, runner_id: int) -> None:
        """Open the session, take the lock, and record in the registration that this runner
        holds one (nothing if not wanted). Database errors propagate; nothing is left open."""
        if not self.wanted:
            return
        session = Liveness(using=self._using, runner_id=runner_id, on_release=self._on_release)
        session.start()
        try:
            membership.set_liveness_lock(runner_id, True, using=self._using)
        except BaseException:
            session.close()
            raise
        self._session, self.retry = session, float("inf")

    def close(self, now: float) -> None:
        """Close the session (if any); try to open one again from ``now``."""
        if self._session is not None:
            self._session.close()
        self._session = None
        self.retry = now
