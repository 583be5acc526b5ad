"""Where singletons run: fair shares over the live runners, by rendezvous hashing.

Pure functions over a ``View`` (the live runners and how many placed leases each holds),
so the policy is tested without a database. The runner applies it:

- a runner takes a free placed lease while it holds fewer than its fair share; at its
  share (up to ``SLACK`` above it) only once no runner is below its share or the lease has
  stayed free for a while, so a handoff goes to the runner it was meant for; the runner
  that ranks first for a lease polls for it most often, so assignments are stable and
  follow the hash;
- a runner holding more than its fair share hands off its whole excess at a renewal, each
  lease to the best-ranked runner below its share with room for it: a joining runner
  receives its share by graceful handoff at the others' next renewal;
- nothing moves while every runner is at or below its share, so a slow runner causes no
  flapping.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cluster_singletons.clock import Clock, SystemClock

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


def may_take(
    me: int, view: View, total: int, *, free_for: float = math.inf, patience: float = 0.0
) -> bool:
    """Whether ``me`` may take a placed lease found free, free for ``free_for`` seconds
    as far as ``me`` has seen.

    - Below its fair share: yes.
    - From its share to ``SLACK`` above it: only once no other live runner is below its
      share, or the lease has stayed free for ``patience``. The runners below their share
      (the targets of a handoff) take theirs well within that, so a runner that has just
      handed off its own excess does not take another's handoff; a lease none of them
      takes (its target's work for it has not stopped) is still taken.
    - Beyond: no.
    """
    live = set(view.held) | {me}
    share = fair_share(total, len(live))
    held = view.held.get(me, 0)
    if held < share:
        return True
    if held >= share + SLACK:
        return False
    lacking = any(n < share for runner, n in view.held.items() if runner != me)
    return not lacking or free_for >= patience


def rank_of(me: int, name: str, view: View) -> int:
    """0 for the preferred runner of ``name``; standbys further down poll less often."""
    order = ranking(name, set(view.held) | {me})
    return order.index(me)


def handoff(me: int, mine: Iterable[str], view: View, total: int) -> list[tuple[str, int]]:
    """Every lease ``me`` should hand off this renewal, each with the runner meant to take it.

    ``mine`` is what ``me`` leads; that is its count here, since the view (read from the
    database) may still count leases it stepped down from and not yet released. The live
    runners are the view's, and ``me`` even if the view missed it.

    - Only while ``me`` leads more than its fair share, and no more than the excess: nothing
      moves while every runner is at or below its share.
    - Only to live runners below their share, never pushing one above it. The runners
      above their share split that room between them (``_room``), so runners acting on
      the same view fill it together without overshooting.
    - Each name at most once, to the runner ranked best for it among the others that still
      has room; names that rank ``me`` lowest go first, so assignments follow the hash.
    """
    names = sorted(set(mine))
    live = set(view.held) | {me}
    share = fair_share(total, len(live))
    held = {**view.held, me: len(names)}
    excess = held[me] - share
    if excess <= 0:
        return []
    room = _room(me, held, share)
    preference: dict[str, list[int]] = {}
    my_rank: dict[str, int] = {}
    for name in names:
        order = ranking(name, live)
        my_rank[name] = order.index(me)
        preference[name] = [runner for runner in order if runner != me]
    names.sort(key=lambda name: -my_rank[name])
    chosen: list[tuple[str, int]] = []
    handed: set[str] = set()
    for depth in range(len(live) - 1):
        for name in names:
            target = preference[name][depth]
            if name not in handed and room.get(target, 0) > 0:
                room[target] -= 1
                handed.add(name)
                chosen.append((name, target))
                if len(chosen) == excess:
                    return chosen
    return chosen


def _room(me: int, held: Mapping[int, int], share: int) -> dict[int, int]:
    """How many leases ``me`` may hand each runner below ``share``.

    Each runner above its share gets a part of every lacking runner's room in proportion
    to its excess, rounded down; the units left over go, in order of runner id, to the
    runners still short of their excess. Computed alike by every runner from the same view,
    the parts never add up to more than a runner lacks, and each runner above its share
    can hand off its whole excess when the room allows; a runner alone above its share may
    use all the room, so its choice follows the hash alone.
    """
    excess = {r: n - share for r, n in sorted(held.items()) if n > share}
    lacks = {r: share - n for r, n in sorted(held.items()) if n < share}
    over = sum(excess.values())
    part = {g: {t: room * e // over for t, room in lacks.items()} for g, e in excess.items()}
    left = {t: room - sum(part[g][t] for g in part) for t, room in lacks.items()}
    for g, e in excess.items():
        short = e - sum(part[g].values())
        for t in left:
            extra = min(short, left[t])
            if extra > 0:
                part[g][t] += extra
                left[t] -= extra
                short -= extra
    return {t: n for t, n in part.get(me, {}).items() if n > 0}


class Placed:
    """One runner's placed leases (names starting with ``prefix``) and its latest ``View``;
    what the runner asks the policy above, with its own state filled in."""

    def __init__(
        self,
        prefix: str | None,
        names: Iterable[str],
        *,
        clock: Clock | None = None,
        patience: float = 0.0,
        poll_every: float = 0.0,
    ) -> None:
        """``patience``: how long a lease must stay free before a runner at its share takes
        it while another is below its share (see ``may_take``); ``poll_every``: the base
        interval of the runner's polls (``poll_interval``)."""
        self.prefix = prefix
        self.total = sum(1 for name in names if self.covers(name))
        self.view: View | None = None
        self.clock: Clock = clock or SystemClock()
        self.patience, self.poll_every = patience, poll_every
        #: When this runner first, and last, found each placed lease free.
        self._free_seen: dict[str, tuple[float, float]] = {}

    def covers(self, name: str) -> bool:
        return self.prefix is not None and name.startswith(self.prefix)

    def may_take(self, me: int, name: str) -> bool:
        """Whether to take ``name``, just found free."""
        if self.view is None or not self.covers(name):
            return True
        now = self.clock.monotonic()
        first, last = self._free_seen.get(name, (now, now))
        if now - last > 2 * self.poll_interval(me, name):
            first = now  # a poll found it held since: this is a new spell of being free
        self._free_seen[name] = (first, now)
        return may_take(me, self.view, self.total, free_for=now - first, patience=self.patience)

    def poll_interval(self, me: int, name: str) -> float:
        """How often to poll for ``name`` (``poll_every`` at best): standbys poll less
        often the lower they rank for the lease, so the best-ranked runner usually wins it
        and assignments follow the hash."""
        if self.view is None or not self.covers(name):
            return self.poll_every
        return self.poll_every * (1 + rank_of(me, name, self.view))

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

    def handoff(self, me: int, held: Iterable[str]) -> list[tuple[str, int]]:
        """The leases to hand off now and to whom, if this runner holds more than its share."""
        if self.view is None:
            return []
        return handoff(me, [name for name in held if self.covers(name)], self.view, self.total)
