"""The coordinator's decisions, as pure functions of its slots, ``now`` and the settings.

One coordinator pass (``Runner.step``) asks ``decide`` what to do and does it: which
terms to give up, how to react to leader work that ended on its own, whether to renew,
which standing leases to poll, which work to restart, whether to prune; then
``next_wake`` says when the next pass is due. Nothing here touches the database, a
thread or a clock, so every rule is tested with plain values.

Rules:

- A leader believes it leads only until its belief window closes (``pacing.belief_window``
  after the renewal was sent): then it gives the term up, before the database can hand
  the lease to someone else.
- Work refused a fenced write ends the term at once; work that failed restarts after a
  capped backoff that grows with its crashes; work that returned holds the lease idle.
- Standing leases due to be polled within half an ``acquire_interval`` are polled
  together, so one read serves them and polls stay on one grid.
- Nothing is taken, and stepped-down terms are not released, while the runner may not
  lead (PostgreSQL: its liveness session is down).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cluster_singletons.conf import ClusterSettings
from cluster_singletons.pacing import Backoff

#: How leader work that stopped on its own while its term is current ended.
Ended = Literal["returned", "failed", "fenced-out"]


@dataclass(frozen=True, kw_only=True)
class SlotState:
    """What the decisions need to know of one slot, at the start of a pass."""

    name: str
    leading: bool
    believed_until: float = 0.0
    next_acquire: float = 0.0
    restart_at: float | None = None
    #: Its work thread is running.
    working: bool = False
    #: How its work ended on its own while the term is current (None: it has not).
    ended: Ended | None = None
    crashes: int = 0


@dataclass(frozen=True, kw_only=True)
class Timers:
    """When the runner's periodic duties are next due (monotonic seconds)."""

    heartbeat: float
    prune: float
    liveness: float = float("inf")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one pass does, in this order."""

    #: Work that failed: restart it at this time (its crash count rises by one).
    restart_at: dict[str, float] = field(default_factory=dict)
    #: Work that returned: hold the lease idle until the term ends.
    idle: list[str] = field(default_factory=list)
    #: Terms to give up now, with the reason.
    give_up: list[tuple[str, str]] = field(default_factory=list)
    renew: bool = False
    #: Release the rows of terms given up whose work has ended.
    release: bool = False
    #: Standing leases to poll (one read for all), then try to take those found free.
    poll: list[str] = field(default_factory=list)
    #: Work to start again: its restart time has come.
    restart: list[str] = field(default_factory=list)
    prune: bool = False


def decide(
    slots: Sequence[SlotState],
    timers: Timers,
    now: float,
    settings: ClusterSettings,
    *,
    may_lead: bool,
) -> Plan:
    """The plan of the pass at monotonic time ``now``; see the module docstring."""
    plan = Plan(
        renew=now >= timers.heartbeat,
        release=may_lead,
        prune=now >= timers.prune,
    )
    for slot in slots:
        if not slot.leading:
            continue
        if slot.ended == "fenced-out":
            plan.give_up.append((slot.name, "a fenced write was refused"))
            continue
        if slot.ended == "failed":
            delay = Backoff.from_settings(settings, failures=slot.crashes).delay
            plan.restart_at[slot.name] = now + delay
        elif slot.ended == "returned":
            plan.idle.append(slot.name)
        if now >= slot.believed_until:
            plan.give_up.append((slot.name, "lease not renewed in time"))
        elif slot.restart_at is not None and now >= slot.restart_at:
            plan.restart.append(slot.name)
    standing = [s for s in slots if not s.leading and not s.working]
    if may_lead and any(now >= s.next_acquire for s in standing):
        horizon = now + settings.acquire_interval / 2
        plan.poll.extend(s.name for s in standing if s.next_acquire <= horizon)
    return plan


def lost_in_renewal(held: Iterable[str], kept: set[str]) -> list[str]:
    """The terms a renewal did not cover: expired, taken, released or handed off."""
    return [name for name in held if name not in kept]


def next_wake(slots: Sequence[SlotState], timers: Timers) -> float:
    """When the next pass is due: the first timer, belief deadline, poll or restart."""
    return min(
        [timers.heartbeat, timers.prune, timers.liveness]
        + [s.believed_until for s in slots if s.leading]
        + [s.next_acquire for s in slots if not s.leading]
        + [s.restart_at for s in slots if s.restart_at is not None]
    )
