"""The keeper of this process's Snowflake machine id: leases one from the database
(``machine_ids``) and renews it every third of the TTL, in a thread of its own.

All database work runs in the keeper's own daemon thread, on that thread's own
connection (closed after every statement), never in the caller's transaction: a lease
rolled back with a caller's transaction would be believed but not held. A forked child's
keeper starts a new thread and so a new connection; the parent's keeper makes no
database call while ``fork()`` runs.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, TypeVar

from django.core.exceptions import AppRegistryNotReady, ImproperlyConfigured
from django.db import DatabaseError, InterfaceError, connections

from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.errors import MachineIdsExhausted, MachineIdUnavailable, describe
from cluster_singletons.pacing import Backoff, belief_window
from cluster_singletons.snowflake.contract import Grant
from cluster_singletons.snowflake.machine_ids import acquire, ensure, release, renew

logger = logging.getLogger("cluster_singletons.snowflake")

T = TypeVar("T")


_UNAVAILABLE = (DatabaseError, InterfaceError, ImproperlyConfigured, AppRegistryNotReady)


_RELEASE_TIMEOUT = 5.0


_FORK_WAIT = 10.0


def _refuse_sqlite_deadlock(using: str) -> None:
    """Fail at once where the keeper's write would wait for a lock its caller holds."""
    caller = connections[using]
    if caller.vendor == "sqlite" and caller.in_atomic_block:
        raise DatabaseError(
            "database is locked by this thread's own transaction: on SQLite the machine id "
            "lease cannot be written while the thread asking for it is in a transaction"
        )


class MachineIdKeeper:
    """Holds one machine id for this process and renews it every third of the TTL.

    All database work runs in the keeper's own daemon thread, on that thread's own
    connection (closed after every statement), never in the caller's transaction: a
    lease rolled back with a caller's transaction would be believed but not held. A
    forked child's keeper starts a new thread and so a new connection; the parent's
    keeper makes no database call while ``fork()`` runs.
    """

    def __init__(
        self,
        *,
        using: str,
        ttl: float,
        max_clock_behind: float,
        clock: Clock | None = None,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 10.0,
    ) -> None:
        self.using = using
        self.ttl = ttl
        self.clock: Clock = clock or SystemClock()
        self._max_behind_ms = int(max_clock_behind * 1000)
        window = belief_window(ttl)
        self._window_ns = int(window * 1e9)
        self._window_ms = int(window * 1000)
        self._renew_every_ns = int(ttl / 3 * 1e9)
        self._initial_backoff = Backoff(initial=retry_backoff, maximum=retry_backoff_max)
        self.after_fork_in_child()

    def before_fork(self) -> None:
        """Wait for the keeper's database call in flight, and start no other until after.

        A child forked while another thread is inside SQLite (or libpq) can inherit that
        library's internal mutexes locked, and hang on its first query.
        """
        self._paused = self._io_lock.acquire(timeout=_FORK_WAIT)
        if not self._paused:
            logger.warning("forking while a Snowflake machine id query is still running")

    def after_fork_in_parent(self) -> None:
        if self._paused:
            self._io_lock.release()

    def after_fork_in_child(self) -> None:
        """Drop the lease, the thread and every lock without I/O (a forked child's reset)."""
        self._io_lock = threading.Lock()
        self._paused = False
        self._mutex = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._grant: Grant | None = None
        self._on_change: Callable[[Grant], None] | None = None
        self._next_renewal_ns: int | None = None
        self._backoff = self._initial_backoff

    @property
    def grant(self) -> Grant | None:
        """The current lease, as last published."""
        return self._grant

    def acquire(self, on_change: Callable[[Grant], None]) -> None:
        """Renew the current lease or take a new one; ``on_change`` receives the grant."""
        seen = self._grant
        with self._mutex:
            self._on_change = on_change
            grant = self._grant
            if (
                grant is not seen
                and grant is not None
                and grant.held
                and self.clock.monotonic_ns() < grant.believed_until_ns
            ):
                return  # another thread renewed or acquired while this one waited
            try:
                _refuse_sqlite_deadlock(self.using)
                self._call(self._take)
            except _UNAVAILABLE as exc:
                raise MachineIdUnavailable(self.using, exc) from exc

    def renew(self) -> bool:
        """Renew now (the keeper thread does it on schedule); False if the lease is lost."""
        with self._mutex:
            grant = self._grant
            if grant is None or not grant.held:
                return False
            return self._call(functools.partial(self._renew, grant))

    def release(self, last_ms: int) -> None:
        """Free the machine id at once and stop the thread (it restarts on the next lease)."""
        with self._mutex:
            thread, grant = self._thread, self._grant
            if thread is None or not thread.is_alive():
                return
            try:
                if grant is not None and grant.held:
                    self._call(functools.partial(self._give_back, grant, last_ms), _RELEASE_TIMEOUT)
            except (*_UNAVAILABLE, TimeoutError) as exc:
                logger.warning(
                    "could not release Snowflake machine id %d (%s); it expires in %gs",
                    grant.machine_id if grant else -1,
                    describe(exc),
                    self.ttl,
                )
            finally:
                self._jobs.put(None)
                thread.join(_RELEASE_TIMEOUT)
                self._thread = None

    # -- in the keeper thread ------------------------------------------------------------

    def _call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        if self._thread is None or not self._thread.is_alive():
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._run, args=(self._jobs,), name="snowflake-machine-id", daemon=True
            )
            self._thread.start()
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future.result(timeout)

    def _run(self, jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None]) -> None:
        while True:
            due = self._next_renewal_ns
            timeout = None if due is None else max(0.0, (due - self.clock.monotonic_ns()) / 1e9)
            try:
                job = jobs.get(timeout=timeout)
            except queue.Empty:
                with self._io_lock:
                    self._renew_on_schedule()
                continue
            if job is None:
                return
            fn, future = job
            with self._io_lock:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
                finally:
                    self._close_connection()

    def _close_connection(self) -> None:
        # One statement every third of the TTL does not need an idle connection per process.
        try:
            connections[self.using].close()
        except Exception as exc:
            logger.debug("closing the keeper's connection failed: %s", describe(exc))

    def _take(self) -> None:
        grant = self._grant
        if grant is not None and grant.held and self._renew(grant):
            return
        sent_ns, sent_ms = self.clock.monotonic_ns(), self.clock.time_ns() // 1_000_000
        token = uuid.uuid4().hex
        lease = functools.partial(
            acquire,
            holder=token,
            host=socket.gethostname(),
            pid=os.getpid(),
            ttl=self.ttl,
            now_ms=sent_ms,
            max_behind_ms=self._max_behind_ms,
            reserve_until_ms=sent_ms + self._window_ms,
            using=self.using,
        )
        got = lease()
        if got is None and ensure(using=self.using):
            got = lease()
        if got is None:
            raise MachineIdsExhausted(self.using, self.ttl)
        logger.info("process %d leased Snowflake machine id %d", os.getpid(), got.machine_id)
        self._publish(
            Grant(
                machine_id=got.machine_id,
                token=token,
                floor_ms=got.floor_ms,
                reserved_until_ms=sent_ms + self._window_ms,
                believed_until_ns=sent_ns + self._window_ns,
            ),
            sent_ns,
        )

    def _renew(self, grant: Grant) -> bool:
        sent_ns, sent_ms = self.clock.monotonic_ns(), self.clock.time_ns() // 1_000_000
        reserve = sent_ms + self._window_ms
        if renew(
            grant.machine_id,
            holder=grant.token,
            ttl=self.ttl,
            reserve_until_ms=reserve,
            using=self.using,
        ):
            self._publish(
                replace(
                    grant, reserved_until_ms=reserve, believed_until_ns=sent_ns + self._window_ns
                ),
                sent_ns,
            )
            return True
        logger.warning(
            "Snowflake machine id %d was lost (lease expired or taken); the next id leases another",
            grant.machine_id,
        )
        self._publish(replace(grant, held=False), sent_ns)
        return False

    def _renew_on_schedule(self) -> None:
        grant, now = self._grant, self.clock.monotonic_ns()
        if grant is None or not grant.held:
            self._next_renewal_ns = None
            return
        try:
            self._renew(grant)
            self._backoff = self._backoff.reset()
        except Exception as exc:  # the keeper thread must outlive any failure
            delay = min(self._backoff.delay, self.ttl / 3)
            logger.warning(
                "renewing Snowflake machine id %d failed (%s); retrying in %.1fs",
                grant.machine_id,
                describe(exc),
                delay,
            )
            self._backoff = self._backoff.failed()
            self._next_renewal_ns = now + int(delay * 1e9)
        finally:
            self._close_connection()

    def _give_back(self, grant: Grant, last_ms: int) -> None:
        self._grant, self._next_renewal_ns = None, None
        release(grant.machine_id, holder=grant.token, last_ms=last_ms, using=self.using)

    def _publish(self, grant: Grant, sent_ns: int) -> None:
        self._grant = grant
        self._next_renewal_ns = sent_ns + self._renew_every_ns if grant.held else None
        if self._on_change is not None:
            self._on_change(grant)
