"""The runner: one process's membership in the cluster and its coordinator loop.

A runner registers itself, keeps its registration alive, and for every lease it is
given work for, either leads it (renewing the lease and running the work in a thread of
its own) or stands by (trying to take it every ``acquire_interval``). Its hosts are the
``runcluster`` command, the beat scheduler and the worker bootstep; they only start and
stop it.

Leadership rules kept here:

- A leader believes it leads only until ``renewed + ttl - margin`` by its own monotonic
  clock, measured from *before* the renewal statement was sent, so it stops believing
  before the database can hand the lease to someone else.
- A renewal that fails to cover a term, a fenced write refused, or a lost liveness
  session ends the term at once.
- Stopping releases every lease in one statement, so standbys take over immediately.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping

from django.db import DatabaseError, InterfaceError, connections

from cluster_singletons import metrics
from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.cluster import leases, membership, placement
from cluster_singletons.cluster.crash_detection import Liveness
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import LeaderWork
from cluster_singletons.cluster.placement import View
from cluster_singletons.cluster.slot import Slot
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import DatabaseUnavailable, describe
from cluster_singletons.pacing import Backoff, belief_window

logger = logging.getLogger("cluster_singletons.runner")

_DB_ERRORS = (DatabaseError, InterfaceError)
_PRUNE_EVERY = 60.0
#: Renewal intervals a runner leaves a lease it handed off alone for the target to take it;
#: if the target never does (it stopped meanwhile), the lease is orphaned no longer than this.
_HANDOFF_COOLDOWN = 1


class Runner:
    """Membership and leadership for one process; see the module docstring."""

    def __init__(
        self,
        work: Mapping[str, LeaderWork],
        *,
        kind: str = "runcluster",
        settings: ClusterSettings | None = None,
        clock: Clock | None = None,
        placement_prefix: str | None = None,
    ) -> None:
        """``work``: leader work per lease name. Leases named ``placement_prefix…`` are
        spread over the live runners (see ``placement``); the others go to whoever is first."""
        self.settings = settings or get_settings()
        self.kind = kind
        self.clock: Clock = clock or SystemClock()
        self.using = self.settings.database
        prefix = self.settings.key_prefix
        self._slots = {
            prefix + name: Slot(name=prefix + name, work=fn) for name, fn in work.items()
        }
        self._placed = placement.Placed(
            None if placement_prefix is None else prefix + placement_prefix, self._slots
        )
        self.runner_id: int | None = None
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._liveness: Liveness | None = None
        self._db_backoff = Backoff.from_settings(self.settings)
        self._next_heartbeat = 0.0
        self._next_prune = 0.0
        self._next_liveness = float("inf")
        #: Terms this runner stepped down from whose lease rows may still name it.
        self._unreleased: list[Term] = []

    # -- hosting -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the coordinator loop in a background thread."""
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

    def wake(self) -> None:
        self._wake.set()

    def leads(self, name: str) -> bool:
        slot = self._slots.get(self.settings.key_prefix + name)
        return bool(slot and slot.term)

    def terms(self) -> Iterator[Term]:
        return (slot.term for slot in self._slots.values() if slot.term is not None)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Register (retrying), coordinate until stopped, then hand off and deregister."""
        try:
            if not self.register():
                return
            while not self._stopping.is_set():
                now = self.clock.monotonic()
                next_at = self.step(now)
                self._wake.clear()
                if not self._stopping.is_set():
                    self.clock.wait(self._wake, next_at - self.clock.monotonic())
            self._shutdown()
        except BaseException as exc:  # the loop must never die silently
            self.error = exc
            logger.exception("coordinator loop crashed; leadership is being abandoned")
            self._abandon()
        finally:
            self._ready.set()
            connections.close_all()

    def register(self) -> bool:
        """Register, retrying with capped backoff up to ``startup_timeout``; False if it gave up."""
        start = self.clock.monotonic()
        backoff = self._db_backoff
        host = socket.gethostname()
        while not self._stopping.is_set():
            try:
                self.runner_id = membership.register(
                    host=host, pid=os.getpid(), kind=self.kind, using=self.using
                )
                leases.ensure(self._slots, using=self.using)
                self._start_liveness()
            except _DB_ERRORS as exc:
                self.runner_id = None
                waited = self.clock.monotonic() - start
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
                connections[self.using].close()
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

    def step(self, now: float) -> float:
        """One pass of the coordinator at monotonic time ``now``; returns when the next is due."""
        assert self.runner_id is not None
        if self._liveness is not None and self._liveness.lost.is_set():
            self._step_down_all("liveness session lost")
            self._close_liveness()
        may_lead = self._ensure_liveness(now)
        for slot in self._slots.values():
            self._reap(slot, now)
            if slot.term and now >= slot.believed_until:
                self._step_down(slot, "lease not renewed in time")
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        if self._unreleased and may_lead:
            self._release_stepped_down(now)
        standing = [s for s in self._slots.values() if s.term is None and not s.alive]
        if may_lead and any(now >= s.next_acquire for s in standing):
            # One read serves every lease due now or within half an interval, so polls
            # stay on one grid instead of drifting apart from their own late wake-ups.
            horizon = now + self.settings.acquire_interval / 2
            self._acquire_due([s for s in standing if s.next_acquire <= horizon], now)
        for slot in self._slots.values():
            if slot.term and slot.restart_at is not None and now >= slot.restart_at:
                self._start_work(slot)
        if now >= self._next_prune:
            self._prune(now)
        return min(
            [self._next_heartbeat, self._next_prune, self._next_liveness]
            + [s.believed_until for s in self._slots.values() if s.term]
            + [s.next_acquire for s in self._slots.values() if s.term is None]
            + [s.restart_at for s in self._slots.values() if s.restart_at is not None]
        )

    def _db(self, what: str) -> _DbAttempt:
        return _DbAttempt(self, what)

    def _heartbeat(self, now: float) -> None:
        assert self.runner_id is not None
        held = [s.term for s in self._slots.values() if s.term]
        with self._db("renew") as attempt:
            sent_at = self.clock.monotonic()
            if not membership.touch(self.runner_id, using=self.using):
                self._reregister()
                return
            kept = leases.renew(self.runner_id, held, ttl=self.settings.lease_ttl, using=self.using)
            for slot in self._slots.values():
                if slot.term is None:
                    continue
                if slot.name in kept:
                    slot.believed_until = sent_at + self._belief_window
                else:
                    self._step_down(slot, "renewal found the lease expired, taken or handed off")
            if self._placed.prefix is not None:
                self._placed.view = View(
                    held=membership.live_view(
                        ttl=self.settings.lease_ttl,
                        lease_prefix=self._placed.prefix,
                        crash_detection=self._liveness is not None,
                        using=self.using,
                    )
                )
                self._rebalance(now)
            self._next_heartbeat = now + self.settings.renew_interval
        if attempt.failed:
            self._next_heartbeat = now + min(attempt.delay, self.settings.renew_interval)

    @property
    def _belief_window(self) -> float:
        return belief_window(self.settings.lease_ttl)

    def _acquire_due(self, due: list[Slot], now: float) -> None:
        """One read finds which due leases are takeable, so standing by costs one query per
        poll, not one per lease; only those are tried."""
        assert self.runner_id is not None
        with self._db("poll") as attempt:
            free = leases.takeable(
                [slot.name for slot in due],
                runner_id=self.runner_id,
                ttl=self.settings.lease_ttl,
                crash_detection=self._liveness is not None,
                using=self.using,
            )
        for slot in due:
            if attempt.failed:
                slot.next_acquire = now + attempt.delay
            elif slot.name in free and self._placed.may_take(self.runner_id, slot.name):
                self._try_acquire(slot, now)
            else:
                slot.next_acquire = now + self._poll_interval(slot)

    def _try_acquire(self, slot: Slot, now: float) -> None:
        assert self.runner_id is not None
        with self._db("acquire") as attempt:
            sent_at = self.clock.monotonic()
            term = leases.acquire(
                slot.name,
                self.runner_id,
                ttl=self.settings.lease_ttl,
                using=self.using,
                crash_detection=self._liveness is not None,
            )
            slot.next_acquire = now + self._poll_interval(slot)
            if term is not None:
                metrics.LEADER_CHANGES.labels(slot.name).inc()
                metrics.LEADING.labels(slot.name).set(1)
                self._placed.count(self.runner_id, slot.name, +1)
                slot.term, slot.believed_until, slot.crashes = (
                    term,
                    sent_at + self._belief_window,
                    0,
                )
                logger.info("runner %s leads %r at epoch %s", self.runner_id, slot.name, term.epoch)
                self._start_work(slot)
        if attempt.failed:
            slot.next_acquire = now + attempt.delay

    # -- placement ---------------------------------------------------------------------

    def _poll_interval(self, slot: Slot) -> float:
        assert self.runner_id is not None
        return self._placed.poll_interval(self.runner_id, slot.name, self.settings.acquire_interval)

    def _rebalance(self, now: float) -> None:
        """Hand off one placed lease if this runner holds more than its fair share."""
        assert self.runner_id is not None
        mine = [slot.name for slot in self._slots.values() if slot.term]
        proposal = self._placed.handoff(self.runner_id, mine)
        if proposal is None:
            return
        name, target = proposal
        slot = self._slots[name]
        self._step_down(slot, f"handing off to runner {target} to balance the cluster")
        # Stay away long enough for the target to take it.
        slot.next_acquire = now + _HANDOFF_COOLDOWN * self.settings.renew_interval

    def _start_work(self, slot: Slot) -> None:
        slot.start_work(
            using=self.using, ttl=self.settings.lease_ttl, clock=self.clock, on_end=self._wake.set
        )

    def _reap(self, slot: Slot, now: float) -> None:
        """React to leader work that ended on its own while its term is current."""
        if slot.term is None or slot.restart_at is not None or slot.alive:
            return
        if slot.thread is None or slot.stop_event.is_set():
            return
        if slot.outcome == "fenced-out":
            self._step_down(slot, "a fenced write was refused")
        elif slot.outcome == "failed":
            slot.crashes += 1
            delay = Backoff.from_settings(self.settings, failures=slot.crashes - 1).delay
            slot.restart_at = now + delay
            logger.warning(
                "restarting work for %r in %.1fs (crash %d)", slot.name, delay, slot.crashes
            )
        elif slot.outcome == "returned":
            logger.info(
                "work for %r returned; holding the lease idle until the term ends", slot.name
            )
            slot.stop_event.set()

    def _step_down(self, slot: Slot, reason: str) -> None:
        if slot.term is None:
            return
        logger.warning(
            "runner %s steps down from %r (epoch %s): %s",
            self.runner_id,
            slot.name,
            slot.term.epoch,
            reason,
        )
        slot.stop_event.set()
        metrics.LEADING.labels(slot.name).set(0)
        if self.runner_id is not None:
            self._placed.count(self.runner_id, slot.name, -1)
        self._unreleased.append(slot.term)
        slot.term, slot.restart_at = None, None
        slot.next_acquire = self.clock.monotonic() + self.settings.acquire_interval

    def _release_stepped_down(self, now: float) -> None:
        """Free the rows of terms this runner gave up, once their work has ended, so no one
        waits for their expiry."""
        assert self.runner_id is not None
        done = [t for t in self._unreleased if not self._slots[t.name].alive]
        if not done:
            return
        with self._db("release"):
            leases.release(self.runner_id, using=self.using, terms=done)
            self._unreleased = [t for t in self._unreleased if t not in done]

    def _step_down_all(self, reason: str) -> None:
        for slot in self._slots.values():
            self._step_down(slot, reason)

    def _prune(self, now: float) -> None:
        with self._db("prune"):
            forgotten = membership.forget_stale(
                older_than=self.settings.runner_forget_after, using=self.using
            )
            if forgotten:
                logger.info(
                    "forgot %d runner registrations not seen for %.0fs",
                    forgotten,
                    self.settings.runner_forget_after,
                )
        self._next_prune = now + _PRUNE_EVERY

    def _reregister(self) -> None:
        logger.error(
            "runner %s: registration was deleted (not seen for %.0fs); registering again",
            self.runner_id,
            self.settings.runner_forget_after,
        )
        self._step_down_all("registration deleted")
        self._close_liveness()
        self.runner_id = membership.register(
            host=socket.gethostname(), pid=os.getpid(), kind=self.kind, using=self.using
        )
        self._start_liveness()

    # -- liveness (PostgreSQL) ---------------------------------------------------------

    def _wants_liveness(self) -> bool:
        return (
            self.settings.crash_detection == "auto"
            and connections[self.using].vendor == "postgresql"
        )

    def _start_liveness(self) -> None:
        """Take the liveness lock and record that this runner holds one."""
        if not self._wants_liveness():
            return
        assert self.runner_id is not None
        liveness = Liveness(using=self.using, runner_id=self.runner_id, on_release=self._on_release)
        liveness.start()
        try:
            membership.set_liveness_lock(self.runner_id, True, using=self.using)
        except BaseException:
            liveness.close()
            raise
        self._liveness = liveness

    def _ensure_liveness(self, now: float) -> bool:
        """Whether this runner may take leases: on PostgreSQL only while it holds its lock.

        Its registration says it holds one, so taking a lease without it would invite
        standbys to take the lease straight back.
        """
        if self._liveness is not None or not self._wants_liveness():
            return True
        if now < self._next_liveness:
            return False
        with self._db("liveness") as attempt:
            self._start_liveness()
            self._next_liveness = float("inf")
            logger.info("runner %s: liveness session restored", self.runner_id)
        if attempt.failed:
            self._next_liveness = now + attempt.delay
        return self._liveness is not None

    def _on_release(self) -> None:
        # A lease was released somewhere: standbys try at once instead of at their next poll
        # (for placed leases, only a runner below its fair share, the handoff's target).
        for slot in self._slots.values():
            if slot.term is None and (
                not self._placed.covers(slot.name)
                or (self.runner_id is not None and self._placed.below_share(self.runner_id))
            ):
                slot.next_acquire = min(slot.next_acquire, self.clock.monotonic())
        self._wake.set()

    def _close_liveness(self) -> None:
        if self._liveness is not None:
            self._liveness.close()
        self._liveness = None
        self._next_liveness = self.clock.monotonic()

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
        except _DB_ERRORS as exc:
            logger.error(
                "runner %s could not release its leases (%s); they will expire",
                self.runner_id,
                describe(exc),
            )
        finally:
            self._close_liveness()

    def _abandon(self) -> None:
        for slot in self._slots.values():
            slot.stop_event.set()
            slot.term = None
        self._close_liveness()


class _DbAttempt:
    """Context manager: a database error is logged in one line and paced by backoff."""

    def __init__(self, runner: Runner, what: str) -> None:
        self.runner, self.what = runner, what
        self.failed = False
        self.delay = 0.0

    def __enter__(self) -> _DbAttempt:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        runner = self.runner
        if exc is None:
            runner._db_backoff = runner._db_backoff.reset()
            return False
        if not isinstance(exc, _DB_ERRORS):
            return False
        self.failed, self.delay = True, runner._db_backoff.delay
        logger.warning(
            "runner %s: %s failed (%s); retrying in %.1fs",
            runner.runner_id,
            self.what,
            describe(exc),
            self.delay,
        )
        runner._db_backoff = runner._db_backoff.failed()
        connections[runner.using].close()
        return True
