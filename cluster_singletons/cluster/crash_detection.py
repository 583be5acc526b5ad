"""PostgreSQL liveness: a dedicated session that holds the runner's advisory lock.

While the process lives, its session holds ``pg_advisory_lock(namespace, runner id)``.
When the process dies the server drops the session and the lock with it, which lets
standbys take the dead runner's leases before they expire (see ``leases.acquire``).
The same session LISTENs for lease releases so standbys act on a handoff at once.

That is only true of a direct, stable server session. Behind a pooler in transaction
mode (PgBouncer, and most poolers and proxies that multiplex), the lock lives on
whichever server connection ran ``pg_advisory_lock`` and vanishes when the pooler
recycles it, while the runner lives on. So the session is used only once it is proven
direct, and re-proven on every check:

- the backend the server says we are (``pg_backend_pid()``) is the one the connection's
  startup named (its cancel key): a pooler hands its clients keys of its own;
- the lock is held by that backend, granted.

A session that fails the proof is closed and the runner falls back to lease expiry
(``CrashDetection.how`` says why; its registration says so, which ``cluster_status`` and
the ``W004`` system check show): its leases are taken over only once they expire, so a
pooler never deposes a live leader. A 1:1 TCP proxy or NAT keeps the proof (the session
stays one server session), and only makes a crash seen once the proxy drops it.

Statements: ``pg_backend_pid()``, ``pg_advisory_lock``, ``LISTEN`` and the proof on the
liveness session (``membership.runner_is_gone`` is the condition the stores read off that
lock). Nothing here writes a table but through ``membership``, so nothing needs fencing.
"""

from __future__ import annotations

import logging
import threading
import time
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

#: What a runner's registration says when its session is the proven liveness session.
SESSION = "session"

#: True while this session's own backend holds the runner's lock.
_HOLDS_LOCK = f"""SELECT pg_backend_pid() = %(pid)s AND EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() AND objsubid = 2
      AND mode = 'ExclusiveLock'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = {LIVENESS_LOCK_NAMESPACE}::oid AND objid = %(runner)s::oid)"""


class NotDirect(Exception):
    """The session is not a direct, stable server session; ``str()`` says why."""


def indirect_reason(conn: psycopg.Connection[Any]) -> str | None:
    """Why ``conn`` is not a direct server session, or None if it is."""
    server = conn.execute("SELECT pg_backend_pid()").fetchone()
    pid = server[0] if server else None
    if pid != conn.info.backend_pid:
        return (
            f"the connection goes through a pooler or proxy (the server runs it in backend "
            f"{pid}, the connection was handed key {conn.info.backend_pid})"
        )
    return None


def probe(params: dict[str, Any]) -> str | None:
    """Open a session with ``params`` as the liveness session would: why it would not be
    direct, or None. Database errors raise Django's ``OperationalError``."""
    try:
        with psycopg.connect(**params, autocommit=True) as conn:
            return indirect_reason(conn)
    except psycopg.Error as exc:
        raise OperationalError(describe(exc)) from exc


class Liveness:
    """Owns the liveness session; ``lost`` is set when the session (and the lock) is gone,
    or when the lock is no longer held by the session's own backend."""

    def __init__(
        self,
        *,
        params: dict[str, Any],
        runner_id: int,
        on_release: Callable[[], None],
        check_every: float = 1.0,
    ) -> None:
        self._params = params
        self._runner_id = runner_id
        self._on_release = on_release
        self._check_every = check_every
        self._conn: psycopg.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.lost = threading.Event()

    def start(self) -> None:
        """Open the session, prove it direct, take the lock (never contended: runner ids
        are unique), prove the lock is ours, LISTEN.

        Raises ``NotDirect`` when the proof fails (nothing is left open), and Django's
        ``OperationalError`` for database errors, like every other database error the
        runner paces with backoff, not psycopg's own."""
        try:
            conn = psycopg.connect(**self._params, autocommit=True)
        except psycopg.Error as exc:
            raise OperationalError(describe(exc)) from exc
        try:
            reason = indirect_reason(conn)
            if reason is None:
                conn.execute(
                    "SELECT pg_advisory_lock(%s, %s)", [LIVENESS_LOCK_NAMESPACE, self._runner_id]
                )
                if not self._holds_lock(conn):
                    reason = "the lock taken was not held by the session's own backend"
            if reason is not None:
                raise NotDirect(reason)
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

    def _holds_lock(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute(
            _HOLDS_LOCK, {"pid": conn.info.backend_pid, "runner": self._runner_id}
        ).fetchone()
        return bool(row and row[0])

    def _listen(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while not self._closing.is_set():
                for _ in conn.notifies(timeout=self._check_every):
                    self._on_release()
                # Prove the session is still there, and still ours, even when nothing is
                # announced.
                if not self._holds_lock(conn) and not self._closing.is_set():
                    logger.warning(
                        "liveness session of runner %s no longer holds its lock; leases "
                        "will be stepped down",
                        self._runner_id,
                    )
                    return
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


class Watch:
    """Standbys learn of a dead holder when the server does, not at their next poll.

    For each holder it is told to follow, a thread on a direct session of its own asks for
    the holder's liveness lock, shared, and waits (in ``wait`` slices, so it can be told to
    stop). The server grants it the moment the holder's session ends; the thread lets go
    at once (only the holder's exclusive lock counts as alive) and calls ``on_gone``.
    Failures are logged and retried after ``wait``; they only cost speed, never safety:
    the takeover itself is still ``leases.acquire``'s conditional statement.

    A holder seen gone is watched again only after ``rewatch_after`` seconds: a dead one's
    leases are taken by then; one that only lost its session (it steps down, proves a new
    one and leads again under the same id) is followed again.
    """

    def __init__(
        self,
        *,
        params: dict[str, Any],
        on_gone: Callable[[], None],
        wait: float = 1.0,
        rewatch_after: float = 10.0,
    ) -> None:
        self._params = params
        self._on_gone = on_gone
        self._wait = wait
        self._rewatch_after = rewatch_after
        self._following: dict[int, threading.Event] = {}
        #: Holders seen gone, and when (monotonic).
        self._gone: dict[int, float] = {}
        self._lock = threading.Lock()  # the two above: watch threads change them too

    @property
    def following(self) -> set[int]:
        """The holders being watched now."""
        with self._lock:
            return set(self._following)

    def follow(self, holders: set[int]) -> None:
        """Also watch ``holders`` (but those seen gone in the last ``rewatch_after``
        seconds). A holder is watched until its lock is freed: one session per live runner
        holding a lease this runner stands for, whatever it holds meanwhile."""
        now = time.monotonic()
        with self._lock:
            self._gone = {h: at for h, at in self._gone.items() if now - at < self._rewatch_after}
            new = holders - set(self._gone) - set(self._following)
            started = {holder: threading.Event() for holder in new}
            self._following.update(started)
        for holder, done in started.items():
            threading.Thread(
                target=self._watch, args=(holder, done), name=f"cluster-watch-{holder}", daemon=True
            ).start()

    def close(self) -> None:
        with self._lock:
            following, self._following = self._following, {}
        for done in following.values():
            done.set()

    def _watch(self, holder: int, done: threading.Event) -> None:
        while not done.is_set():
            try:
                if self._wait_for(holder, done):
                    logger.info("runner %s's liveness lock was freed", holder)
                    with self._lock:
                        self._gone[holder] = time.monotonic()
                        if self._following.get(holder) is done:
                            del self._following[holder]
                    self._on_gone()
                    return
            except Exception as exc:  # never silent; retried, costs only speed
                logger.warning("watching runner %s failed (%s); retrying", holder, describe(exc))
                done.wait(self._wait)

    def _wait_for(self, holder: int, done: threading.Event) -> bool:
        """True once ``holder``'s lock was free; False if told to stop first."""
        with psycopg.connect(**self._params, autocommit=True) as conn:
            conn.execute(f"SET lock_timeout = {max(1, int(self._wait * 1000))}")
            while not done.is_set():
                try:
                    conn.execute(
                        "SELECT pg_advisory_lock_shared(%s, %s)", [LIVENESS_LOCK_NAMESPACE, holder]
                    )
                except psycopg.errors.LockNotAvailable:
                    continue
                conn.execute(
                    "SELECT pg_advisory_unlock_shared(%s, %s)", [LIVENESS_LOCK_NAMESPACE, holder]
                )
                return True
        return False


class CrashDetection:
    """One runner's crash detection: its liveness session while it is wanted (PostgreSQL
    with ``crash_detection='auto'``, until the session fails the proof), and when to try
    again after the session was lost. ``how`` is what the registration says."""

    def __init__(self, *, setting: str, using: str, on_release: Callable[[], None]) -> None:
        vendor = connections[using].vendor
        self.wanted = setting == "auto" and vendor == "postgresql"
        self.how = SESSION
        if setting != "auto":
            self.how = f"expiry: crash_detection is {setting!r}"
        elif not self.wanted:
            self.how = f"expiry: {vendor} has no sessions to watch"
        self._using = using
        self._on_release = on_release
        self._session: Liveness | None = None
        self._watch: Watch | None = None
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
        """Open the session (if wanted) and record in the registration how this runner's
        crash is detected. A session that fails the proof makes this runner fall back to
        expiry for good, with one warning. Database errors propagate; nothing is left open."""
        session = None
        if self.wanted:
            params = connections[self._using].get_connection_params()
            session = Liveness(params=params, runner_id=runner_id, on_release=self._on_release)
            try:
                session.start()
            except NotDirect as exc:
                session, self.wanted, self.how = None, False, f"expiry: {exc}"
                logger.warning(
                    "runner %s: crash detection falls back to lease expiry: %s. Its leases "
                    "are taken over only once they expire; set crash_detection='ttl' to say "
                    "so, or point 'database' at an alias that connects directly.",
                    runner_id,
                    exc,
                )
        try:
            membership.set_crash_detection(
                runner_id, lock=session is not None, how=self.how, using=self._using
            )
        except BaseException:
            if session is not None:
                session.close()
            raise
        if session is not None:
            self._session, self.retry = session, float("inf")
            self._watch = Watch(params=params, on_gone=self._on_release)

    def follow(self, holders: set[int]) -> None:
        """Learn of these holders' crashes when the server does (while the session is up)."""
        if self._watch is not None:
            self._watch.follow(holders)

    def close(self, now: float) -> None:
        """Close the session and the watch (if any); try to open one again from ``now``."""
        if self._session is not None:
            self._session.close()
        if self._watch is not None:
            self._watch.close()
        self._session, self._watch = None, None
        self.retry = now
