"""The coordinator: one pass of a runner over the leases it stands for, as an I/O shell.

``step(now)`` asks ``decisions`` what to do (give up terms, react to ended work, renew,
poll, restart, prune) and does it against the stores: renewing every held lease in one
statement, polling every due standing lease in one read, taking the ones found free,
handing off the placed leases this runner holds above its share. The runner
(``runner``) adds the process's lifecycle around it: registration, the loop's thread,
shutdown.

Leadership rules kept here:

- A leader believes it leads only until its belief window closes, measured from *before*
  the renewal statement was sent, so it stops believing before the database can hand the
  lease to someone else.
- A renewal that fails to cover a term, a fenced write refused, or a lost liveness
  session ends the term at once.
- Each renewal's touch returns the database's clock (``database_clock``); no lease is
  taken before one has, since leader work runs on that clock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping

from cluster_singletons import metrics
from cluster_singletons._connection import Attempt, Attempts
from cluster_singletons.clock import Clock, SystemClock
from cluster_singletons.cluster import decisions, leases, membership, placement
from cluster_singletons.cluster.crash_detection import CrashDetection
from cluster_singletons.cluster.database_clock import DatabaseClock
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import LeaderWork
from cluster_singletons.cluster.placement import View
from cluster_singletons.cluster.slot import Slot
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.pacing import Backoff, belief_window

logger = logging.getLogger("cluster_singletons.runner")

_PRUNE_EVERY = 60.0
#: Renewal intervals a runner leaves a lease it handed off alone for the target to take it;
#: if the target never does (it stopped meanwhile), the lease is orphaned no longer than this.
_HANDOFF_COOLDOWN = 1


class Coordinator:
    """The leases one process stands for and what it does about them; see the module
    docstring. ``Runner`` is the class hosts use."""

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
        #: The database's clock, estimated from renewals: the one leader work runs on.
        self.database_clock = DatabaseClock.of(self.clock, self.settings)
        prefix = self.settings.key_prefix
        self._slots = {
            prefix + name: Slot(name=prefix + name, work=fn) for name, fn in work.items()
        }
        self._placed = placement.Placed(
            None if placement_prefix is None else prefix + placement_prefix,
            self._slots,
            clock=self.clock,
            patience=self.settings.renew_interval,
            poll_every=self.settings.acquire_interval,
        )
        self.runner_id: int | None = None
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._crash = CrashDetection(
            setting=self.settings.crash_detection,
            using=self.using,
            on_release=self._on_release,
        )
        self._attempts = Attempts(
            Backoff.from_settings(self.settings),
            using=self.using,
            who=lambda: self.runner_id,
            log=logger,
        )
        self._next_heartbeat = 0.0
        self._next_prune = 0.0
        #: Terms this runner stepped down from whose lease rows may still name it.
        self._unreleased: list[Term] = []

    def wake(self) -> None:
        self._wake.set()

    def leads(self, name: str) -> bool:
        slot = self._slots.get(self.settings.key_prefix + name)
        return bool(slot and slot.term)

    def terms(self) -> Iterator[Term]:
        return (slot.term for slot in self._slots.values() if slot.term is not None)

    # -- one pass --------------------------------------------------------------------

    def step(self, now: float) -> float:
        """One pass of the coordinator at monotonic time ``now``: do what ``decisions``
        decides; returns when the next pass is due."""
        assert self.runner_id is not None
        if self._crash.lost:
            self._step_down_all("liveness session lost")
            self._crash.close(self.clock.monotonic())
        may_lead = self._ensure_liveness(now)
        slots = self._slots
        plan = decisions.decide(
            self._states(), self._timers(), now, self.settings, may_lead=may_lead
        )
        for name, at in plan.restart_at.items():
            slot = slots[name]
            slot.crashes, slot.restart_at = slot.crashes + 1, at
            logger.warning(
                "restarting work for %r in %.1fs (crash %d)", name, at - now, slot.crashes
            )
        for name in plan.idle:
            logger.info("work for %r returned; holding the lease idle until the term ends", name)
            slots[name].stop_event.set()
        for name, reason in plan.give_up:
            self._step_down(slots[name], reason)
        if plan.renew:
            self._heartbeat(now)
        if plan.release and self._unreleased:
            self._release_stepped_down(now)
        if plan.poll:
            self._acquire_due([slots[name] for name in plan.poll], now)
        for name in plan.restart:
            if slots[name].term is not None:  # the renewal may have ended the term
                self._start_work(slots[name])
        if plan.prune:
            self._prune(now)
        return decisions.next_wake(self._states(), self._timers())

    def _states(self) -> list[decisions.SlotState]:
        return [slot.state() for slot in self._slots.values()]

    def _timers(self) -> decisions.Timers:
        return decisions.Timers(
            heartbeat=self._next_heartbeat, prune=self._next_prune, liveness=self._crash.retry
        )

    def _db(self, what: str) -> Attempt:
        return self._attempts.attempt(what)

    def _heartbeat(self, now: float) -> None:
        assert self.runner_id is not None
        held = [s.term for s in self._slots.values() if s.term]
        with self._db("renew") as attempt:
            sent_at = self.clock.monotonic()
            offset = self.database_clock.offset()
            seen = membership.touch(self.runner_id, clock_offset=offset, using=self.using)
            if seen is None:
                self._reregister()
                return
            self.database_clock.observe(sent_at, self.clock.monotonic(), seen)
            kept = leases.renew(self.runner_id, held, ttl=self.settings.lease_ttl, using=self.using)
            for name in decisions.lost_in_renewal((t.name for t in held), kept):
                self._step_down(
                    self._slots[name], "renewal found the lease expired, taken or handed off"
                )
            for name in kept:
                self._slots[name].believed_until = sent_at + self._belief_window
            if self._placed.prefix is not None:
                self._placed.view = View(
                    held=membership.live_view(
                        ttl=self.settings.lease_ttl,
                        lease_prefix=self._placed.prefix,
                        crash_detection=self._crash.active,
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
        if not self.database_clock.synced:  # leader work runs on it: a renewal tells it
            for slot in due:
                slot.next_acquire = now + self._poll_interval(slot)
            return
        free: set[str] = set()
        with self._db("poll") as attempt:
            standing = leases.takeable(
                [slot.name for slot in due],
                runner_id=self.runner_id,
                ttl=self.settings.lease_ttl,
                crash_detection=self._crash.active,
                using=self.using,
            )
            free = standing.free
            self._crash.follow(standing.watched)
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
                crash_detection=self._crash.active,
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
        return self._placed.poll_interval(self.runner_id, slot.name)

    def _rebalance(self, now: float) -> None:
        """Hand off every placed lease this runner holds above its fair share, each to the
        runner placement chose, in this one renewal. Placement failing is logged and
        costs only this renewal's handoff, never the loop."""
        assert self.runner_id is not None
        mine = [slot.name for slot in self._slots.values() if slot.term]
        try:
            proposals = self._placed.handoff(self.runner_id, mine)
        except Exception:
            logger.exception(
                "runner %s: placement failed; no handoff at this renewal", self.runner_id
            )
            return
        if proposals:  # one line, however many: a runner joining takes hundreds at once
            shown = ", ".join(f"{name} to {target}" for name, target in proposals[:5])
            more = f" and {len(proposals) - 5} more" if len(proposals) > 5 else ""
            logger.info("runner %s hands off %s%s", self.runner_id, shown, more)
        for name, target in proposals:
            slot = self._slots[name]
            self._step_down(slot, f"handing off to runner {target}", level=logging.DEBUG)
            # Stay away long enough for the target to take it.
            slot.next_acquire = now + _HANDOFF_COOLDOWN * self.settings.renew_interval

    def _start_work(self, slot: Slot) -> None:
        slot.start_work(
            using=self.using,
            ttl=self.settings.lease_ttl,
            clock=self.database_clock,
            on_end=self._wake.set,
        )

    def _step_down(self, slot: Slot, reason: str, *, level: int = logging.WARNING) -> None:
        if slot.term is None:
            return
        logger.log(
            level,
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
        self._crash.close(self.clock.monotonic())
        self.runner_id = membership.register(
            host=socket.gethostname(), pid=os.getpid(), kind=self.kind, using=self.using
        )
        self._crash.start(self.runner_id)

    # -- liveness (PostgreSQL) ---------------------------------------------------------

    def _ensure_liveness(self, now: float) -> bool:
        """Whether this runner may take leases: on PostgreSQL only while it holds its lock.

        Its registration says it holds one, so taking a lease without it would invite
        standbys to take the lease straight back.
        """
        crash = self._crash
        if crash.due(now):
            assert self.runner_id is not None
            with self._db("liveness") as attempt:
                crash.start(self.runner_id)
                logger.info("runner %s: liveness session restored", self.runner_id)
            if attempt.failed:
                crash.retry = now + attempt.delay
        return crash.may_lead

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
