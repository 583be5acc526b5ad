"""Where singletons run: fair shares over the live runners, by rendezvous hashing.

Pure functions over a ``View`` (the live runners and how many placed leases each holds),
so the policy is tested without a database. The runner applies it:

- a runner takes a free placed lease only while it holds fewer than its fair share plus
  ``SLACK``; the runner that ranks first for a lease polls for it most often, so
  assignments are stable and follow the hash;
- a runner holding more than its fair share hands one lease per renewal to the best-ranked
  runner below its share: a joining runner receives its share by graceful handoff;
- nothing moves while every runner is at or below its share, so a slow runner causes no
  flapping.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SLACK = 1


@dataclass(frozen=True, kw_only=True)
class View:
    """Live runner ids and the number of placed leases each holds."""

    held: Mapping[int, int]

    @property
    def runners(self) -> list[int]:
        return sorted(self.held)


def _score(runner_id: int, name: str) -> int:
    digest = hashlib.blake2b(f"{runner_id}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(name: str, runners: Iterable[int]) -> list[int]:
    """Runners in order of preference for ``name`` (highest rendezvous score first)."""
    return sorted(runners, key=lambda runner: _score(runner, name), reverse=True)


def fair_share(total: int, runners: int) -> int:
    return math.ceil(total / max(runners, 1))


def may_take(me: int, view: View, total: int) -> bool:
    """Whether ``me`` may take one more placed lease."""
    live = set(view.held) | {me}
    return view.held.get(me, 0) < fair_share(total, len(live)) + SLACK


def rank_of(me: int, name: str, view: View) -> int:
    """0 for the preferred runner of ``name``; standbys further down poll less often."""
    order = ranking(name, set(view.held) | {me})
    return order.index(me)


def handoff(me: int, mine: Iterable[str], view: View, total: int) -> tuple[str, int] | None:
    """A lease ``me`` should hand off, and to whom, or None.

    Only a runner above its fair share hands off, and only to a live runner below it.
    """
    live = set(view.held) | {me}
    share = fair_share(total, len(live))
    if view.held.get(me, 0) <= share:
        return None
    below = {runner for runner in live if runner != me and view.held.get(runner, 0) < share}
    if not below:
        return None
    for name in sorted(mine):
        target = next((r for r in ranking(name, live) if r in below or r == me), me)
        if target != me:
            return name, target
    name = min(mine)
    return name, ranking(name, below)[0]


class Placed:
    """One runner's placed leases (names starting with ``prefix``) and its latest ``View``;
    what the runner asks the policy above, with its own state filled in."""

    def __init__(self, prefix: str | None, names: Iterable[str]) -> None:
        self.prefix = prefix
        self.total = sum(1 for name in names if self.covers(name))
        self.view: View | None = None

    def covers(self, name: str) -> bool:
        return self.prefix is not None and name.startswith(self.prefix)

    def may_take(self, me: int, name: str) -> bool:
        if self.view is None or not self.covers(name):
            return True
        return may_take(me, self.view, self.total)

    def poll_interval(self, me: int, name: str, base: float) -> float:
        """Standbys poll less often the lower they rank for the lease, so the best-ranked
        runner usually wins it and assignments follow the hash."""
        if self.view is None or not self.covers(name):
            return base
        return base * (1 + rank_of(me, name, self.view))

    def count(self, me: int, name: str, delta: int) -> None:
        """Keep the view true between refreshes when this runner takes or gives a lease."""
        if self.view is not None and self.covers(name):
            held = dict(self.view.held)
            held[me] = held.get(me, 0) + delta
            self.view = View(held=held)

    def below_share(self, me: int) -> bool:
        if self.view is None:
            return True
        share = fair_share(self.total, len(set(self.view.held) | {me}))
        return self.view.held.get(me, 0) < share

    def handoff(self, me: int, held: Iterable[str]) -> tuple[str, int] | None:
        """The lease to hand off now and to whom, if this runner holds more than its share."""
        if self.view is None:
            return None
        return handoff(me, [name for name in held if self.covers(name)], self.view, self.total)
