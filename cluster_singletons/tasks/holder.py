"""This process's holder of task keys: a registration, its crash detection, and a thread
that keeps both alive and renews every key the process holds.

- One holder per OS process, made on first use in that process (``current()``): under
  prefork each child registers itself after the fork, so a child is the holder of its
  own runs and nothing is shared across a fork.
- The registration is a runner of kind ``task``: it never leads singletons or the beat
  (placement leaves it out). On PostgreSQL (``crash_detection='auto'``, a direct session)
  it holds its liveness lock, so when the process dies (SIGKILL, OOM, a hard time limit)
  its keys are free as soon as the server drops the session; elsewhere they are free when
  their lease expires (``lease_ttl``).
- The keeper thread renews every held key each ``renew_interval`` while the bodies run,
  so no fixed expiry can be outlived by a long task; a renewal that finds a term over
  marks its lock lost (and counts it), and never runs it again.
- ``release`` frees a key at once (and announces it on PostgreSQL); if the database is
  unreachable then, the key expires after the TTL (or the session's end).

Database errors from ``acquire`` propagate: the task retries, it never runs unlocked.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from django.db import connections

from cluster_singletons import metrics
from cluster_singletons._connection import DATABASE_ERRORS, drop_if_unusable
from cluster_singletons.cluster import leases, membership
from cluster_singletons.cluster.crash_detection import CrashDetection
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import describe
from cluster_singletons.models import Runner
from cluster_singletons.pacing import Backoff
from cluster_singletons.tasks.keys import TaskKey
from cluster_singletons.tasks.lock import ClusterLock

logger = logging.getLogger("cluster_singletons.tasks")


class Holder:
    """Registration, crash detection and renewal of task keys for one process."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.using = settings.database
        self.pid = os.getpid()
        self.runner_id: int | None = None
        self._crash: CrashDetection | None = None
        self._held: dict[str, ClusterLock] = {}
        self._lock = threading.Lock()  # the registration and _held: the keeper reads them
        self._keeper: threading.Thread | None = None
        self._closing = threading.Event()

    # -- registration -----------------------------------------------------------------

    def _registered(self) -> int:
        """This process's runner id, registering first if needed (database errors
        propagate, leaving nothing registered)."""
        with self._lock:
            if self.runner_id is None:
                runner_id = membership.register(
                    host=socket.gethostname(),
                    pid=self.pid,
                    kind=Runner.Kind.TASK,
                    using=self.using,
                )
                crash = CrashDetection(
                    setting=self.settings.crash_detection, using=self.using, on_release=_nothing
                )
                try:
                    crash.start(runner_id)
                except BaseException:
                    membership.deregister(runner_id, using=self.using)
                    raise
                self.runner_id, self._crash = runner_id, crash
                logger.info(
                    "task key holder %s registered (pid %s, crash detection: %s)",
                    runner_id,
                    self.pid,
                    crash.how,
                )
            elif self._crash is not None and self._crash.due(time.monotonic()):
                self._crash.start(self.runner_id)  # a lost liveness session, again
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep, name="cluster-task-keys", daemon=True
                )
                self._keeper.start()
            return self.runner_id

    # -- keys -------------------------------------------------------------------------

    def acquire(self, key: TaskKey, *, task_id: str | None) -> ClusterLock | None:
        """Take ``key``'s lease for this process if it is free, expired, or its holder
        is gone; None if another run holds it. Database errors propagate."""
        runner_id = self._registered()
        crash = self._crash
        leases.ensure([key.lease], using=self.using)
        sent = time.monotonic()
        term = leases.acquire(
            key.lease,
            runner_id,
            ttl=self.settings.lease_ttl,
            using=self.using,
            crash_detection=crash is not None and crash.active,
        )
        if term is None:
            return None
        lock = ClusterLock(
            key=key, term=term, task_id=task_id, using=self.using, ttl=self.settings.lease_ttl
        )
        lock.renewed(sent)
        with self._lock:
            self._held[key.lease] = lock
        metrics.TASK_KEYS_ACQUIRED.labels(key.task).inc()
        return lock

    def wait_for(self, key: TaskKey, *, task_id: str | None, timeout: float) -> ClusterLock | None:
        """``acquire``, again every ``acquire_interval`` for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            lock = self.acquire(key, task_id=task_id)
            left = deadline - time.monotonic()
            if lock is not None or left <= 0:
                return lock
            time.sleep(min(self.settings.acquire_interval, left))

    def release(self, lock: ClusterLock) -> None:
        """Free ``lock``'s key now (only its own term). A database error is logged: the
        key is then free when its lease expires."""
        with self._lock:
            if self._held.get(lock.lease) is lock:
                del self._held[lock.lease]
        metrics.TASK_KEY_HOLD_SECONDS.labels(lock.key.task).observe(
            time.monotonic() - lock.taken_at
        )
        try:
            leases.release(lock.term.runner_id, terms=[lock.term], using=self.using, ttl=lock.ttl)
        except DATABASE_ERRORS as exc:
            logger.warning(
                "could not release %r (%s); it is free once its lease expires",
                lock,
                describe(exc),
            )
            drop_if_unusable(self.using)

    # -- the keeper -------------------------------------------------------------------

    def _keep(self) -> None:
        try:
            self._keep_renewing()
        finally:
            connections.close_all()  # this thread's own connections

    def _keep_renewing(self) -> None:
        backoff = Backoff.from_settings(self.settings)
        delay = self.settings.renew_interval
        while not self._closing.wait(delay):
            try:
                self.renew()
                backoff, delay = backoff.reset(), self.settings.renew_interval
            except DATABASE_ERRORS as exc:
                logger.warning("renewing task keys failed (%s); retrying", describe(exc))
                drop_if_unusable(self.using)
                delay = min(backoff.delay, self.settings.renew_interval)
                backoff = backoff.failed()
            except Exception:  # never die silently: what it held can no longer be believed
                logger.exception("renewing task keys crashed; every key is marked lost")
                self._lose_all("the keeper failed")

    def renew(self) -> None:
        """One renewal: a sign of life, the liveness session checked, every held key
        extended; a key whose term is over is marked lost."""
        with self._lock:
            runner_id, crash, held = self.runner_id, self._crash, list(self._held.values())
        if runner_id is None:
            return
        if crash is not None and crash.lost:
            crash.close(time.monotonic())  # others may take our keys now: stop believing
            self._lose_all("its liveness session was lost")
            return
        if membership.touch(runner_id, using=self.using) is None:
            with self._lock:
                self.runner_id = None
            if crash is not None:
                crash.close(time.monotonic())
            self._lose_all("its registration was deleted")
            return
        sent = time.monotonic()
        kept = leases.renew(
            runner_id,
            [lock.term for lock in held if not lock.lost],
            ttl=self.settings.lease_ttl,
            using=self.using,
        )
        for lock in held:
            if lock.lease in kept:
                lock.renewed(sent)
            else:
                self._lose(lock, "its lease was found expired or taken at renewal")

    def _lose(self, lock: ClusterLock, why: str) -> None:
        with self._lock:
            if self._held.get(lock.lease) is not lock or lock.lost:
                return  # released meanwhile, or already counted
            lock.mark_lost()
        metrics.TASK_KEYS_LOST.labels(lock.key.task).inc()
        logger.warning(
            "task %s (%s) lost its key: %s; its fenced writes will be refused",
            lock.task_id,
            lock,
            why,
        )

    def _lose_all(self, why: str) -> None:
        with self._lock:
            held = list(self._held.values())
        for lock in held:
            self._lose(lock, why)

    def holds(self) -> list[ClusterLock]:
        with self._lock:
            return list(self._held.values())

    def close(self) -> None:
        """Stop renewing and close the liveness session (what it holds then expires);
        the registration stays until forgotten."""
        self._closing.set()
        if self._keeper is not None:
            self._keeper.join(timeout=5)
        if self._crash is not None:
            self._crash.close(time.monotonic())


def _nothing() -> None:
    """A task holder acts on no release announcement (it never stands by)."""


_holder: Holder | None = None
#: Holders of processes this one was forked from: kept, never used or closed (their
#: sessions belong to the parent; closing them here would end the parent's).
_inherited: list[Holder] = []
_made = threading.Lock()


def reset() -> None:
    """Close this process's holder and forget it (tests)."""
    global _holder
    with _made:
        if _holder is not None and _holder.pid == os.getpid():
            _holder.close()
        _holder = None


def current() -> Holder:
    """This process's holder (a new one after a fork)."""
    global _holder
    with _made:
        if _holder is None or _holder.pid != os.getpid():
            if _holder is not None:
                _inherited.append(_holder)
            _holder = Holder(get_settings())
        return _holder
