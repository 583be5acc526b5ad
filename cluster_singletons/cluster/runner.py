"""The runner: one process's membership in the cluster, around its coordinator.

A runner registers itself, keeps its registration alive, and for every lease it is
given work for, either leads it (renewing the lease and running the work in a thread of
its own) or stands by (trying to take it every ``acquire_interval``); each pass is the
coordinator's (``coordinator``). Its hosts are the ``runcluster`` command, the beat
scheduler and the worker bootstep; they only start and stop it.

- Registration retries with capped backoff for up to ``startup_timeout``, then gives up
  (``error`` says why; the hosts exit 1).
- The loop never dies silently: a crash is logged, recorded in ``error``, and every term
  is abandoned.
- Stopping ends the leader work, releases every lease in one statement, so standbys take
  over immediately, and deregisters.
- Each loop pass (and each wait for the database at start) touches the probe file
  (``probe``), when ``probe_file`` is set; a clean exit removes it.
- Work that has a standby (``work.stand_by(stop, clock)``, the beat's) runs it in a
  thread of its own from registration until the loop ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from django.db import connections

from cluster_singletons import metrics
from cluster_singletons._connection import DATABASE_ERRORS, drop_if_unusable
from cluster_singletons.cluster import leases, membership, schema
from cluster_singletons.cluster.coordinator import Coordinator
from cluster_singletons.cluster.probe import ProbeFile
from cluster_singletons.errors import DatabaseUnavailable, describe

logger = logging.getLogger("cluster_singletons.runner")


class Runner(Coordinator):
    """Membership and leadership for one process; see the module docstring."""

    #: What this runner says of itself to per-process probes (``probe_file``); ``run``
    #: opens it.
    _probe = ProbeFile(None)

    # -- hosting -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the coordinator loop in a background thread (and serve this process's
        metrics, with ``metrics_port``)."""
        metrics.serve(self.settings.metrics_port, self.settings.metrics_address)
        self._thread = threading.Thread(target=self.run, name="cluster-coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask for a graceful stop: end the work, release every lease, deregister."""
        self._stopping.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; return whether it has."""
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until registered (or failed to); return whether registered."""
        self._ready.wait(timeout)
        return self.runner_id is not None

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Register (retrying), coordinate until stopped, then hand off and deregister."""
        self._probe = ProbeFile.of(self.settings, self.kind)
        standing_by = threading.Event()
        try:
            if not self.register():
                return
            self._stand_by(standing_by)
            while not self._stopping.is_set():
                now = self.clock.monotonic()
                next_at = self.step(now)
                self._touch_probe()
                self._wake.clear()
                if not self._stopping.is_set():
                    self.clock.wait(self._wake, next_at - self.clock.monotonic())
            self._touch_probe()  # says it is stopping: no longer ready
            self._shutdown()
        except BaseException as exc:  # the loop must never die silently
            self.error = exc
            logger.exception("coordinator loop crashed; leadership is being abandoned")
            self._abandon()
        finally:
            standing_by.set()
            self._ready.set()
            self._probe.remove()
            connections.close_all()

    def _touch_probe(self) -> None:
        estimate = self.database_clock.estimate  # as of the last renewal
        self._probe.touch(
            runner_id=self.runner_id,
            renewed=None if estimate is None else estimate.at,
            now=self.clock.monotonic(),
            stopping=self._stopping.is_set(),
        )

    def _stand_by(self, stop: threading.Event) -> None:
        """Start the standby of each lease whose work has one (``work.stand_by``: the
        beat's warm standby), in a thread of its own, until ``stop``."""
        for slot in self._slots.values():
            stand_by = getattr(slot.work, "stand_by", None)
            if stand_by is not None:
                threading.Thread(
                    target=stand_by,
                    args=(stop, self.database_clock),
                    name=f"standby:{slot.name}",
                    daemon=True,
                ).start()

    def register(self) -> bool:
        """Register, retrying with capped backoff up to ``startup_timeout``; False if it gave up."""
        start = self.clock.monotonic()
        backoff = self._attempts.backoff
        host = socket.gethostname()
        while not self._stopping.is_set():
            try:
                self.runner_id = membership.register(
                    host=host, pid=os.getpid(), kind=self.kind, using=self.using
                )
                leases.ensure(self._slots, using=self.using)
                self._crash.start(self.runner_id)
            except DATABASE_ERRORS as exc:
                self.runner_id = None
                waited = self.clock.monotonic() - start
                if (missing := schema.not_migrated(self.using)) is not None:
                    self.error = missing  # no wait fixes this
                    logger.error("giving up: %s", self.error)
                    return False
                if waited + backoff.delay > self.settings.startup_timeout:
                    self.error = DatabaseUnavailable(waited, exc)
                    logger.error("giving up: %s", self.error)
                    return False
                logger.warning(
                    "database unreachable (%s); retrying in %.1fs (waited %.1fs of %.0fs)",
                    describe(exc),
                    backoff.delay,
                    waited,
                    self.settings.startup_timeout,
                )
                drop_if_unusable(self.using)
                self._touch_probe()  # alive while it waits for the database
                self.clock.wait(self._stopping, backoff.delay)
                backoff = backoff.failed()
                continue
            logger.info(
                "runner %s registered (%s:%s, %s); candidate for %s",
                self.runner_id,
                host,
                os.getpid(),
                self.kind,
                ", ".join(sorted(self._slots)),
            )
            self._ready.set()
            return True
        return False

    # -- stopping ----------------------------------------------------------------------

    def _shutdown(self) -> None:
        assert self.runner_id is not None
        logger.info("runner %s stopping: ending leader work and releasing leases", self.runner_id)
        for slot in self._slots.values():
            slot.stop_event.set()
        with self._db("mark stopping"):
            membership.mark_stopping(self.runner_id, using=self.using)
        deadline = self.clock.monotonic() + self.settings.shutdown_timeout
        for slot in self._slots.values():
            if slot.thread is not None:
                slot.thread.join(max(0.0, deadline - self.clock.monotonic()))
                if slot.thread.is_alive():
                    logger.warning("work for %r did not stop in time; releasing anyway", slot.name)
        try:
            released = leases.release(self.runner_id, using=self.using)
            for slot in self._slots.values():
                if slot.term is not None:
                    logger.info(
                        "runner %s released %r (epoch %s)",
                        self.runner_id,
                        slot.name,
                        slot.term.epoch,
                    )
                    slot.term = None
            membership.deregister(self.runner_id, using=self.using)
            logger.info("runner %s stopped; released %d lease(s)", self.runner_id, len(released))
        except DATABASE_ERRORS as exc:
            logger.error(
                "runner %s could not release its leases (%s); they will expire",
                self.runner_id,
                describe(exc),
            )
        finally:
            self._crash.close(self.clock.monotonic())

    def _abandon(self) -> None:
        for slot in self._slots.values():
            slot.stop_event.set()
            slot.term = None
        self._crash.close(self.clock.monotonic())
