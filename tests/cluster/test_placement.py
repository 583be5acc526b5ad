"""Placement policy as pure functions."""

from __future__ import annotations

import pytest

from cluster_singletons.cluster import placement
from cluster_singletons.cluster.placement import View

pytestmark = pytest.mark.unit

NAMES = [f"singleton:s{i}" for i in range(9)]


def _settle(runners: list[int], start: dict[int, list[str]]) -> dict[int, list[str]]:
    """Apply handoffs until none is proposed; a handoff is taken by its target."""
    held = {r: list(start.get(r, [])) for r in runners}
    for _ in range(100):
        moved = False
        for me in runners:
            view = View(held={r: len(v) for r, v in held.items()})
            proposal = placement.handoff(me, held[me], view, len(NAMES))
            if proposal:
                name, target = proposal
                held[me].remove(name)
                held[target].append(name)
                moved = True
        if not moved:
            return held
    raise AssertionError("placement did not settle")


def test_fair_share_rounds_up() -> None:
    assert [placement.fair_share(9, n) for n in (1, 2, 3, 4)] == [9, 5, 3, 3]


def test_ranking_is_stable_and_independent_of_order() -> None:
    assert placement.ranking("a", [1, 2, 3]) == placement.ranking("a", [3, 1, 2])
    assert len({tuple(placement.ranking(n, [1, 2, 3])) for n in NAMES}) > 1


def test_a_joining_runner_receives_its_share_by_handoff() -> None:
    settled = _settle([1, 2, 3], {1: NAMES[:5], 2: NAMES[5:]})
    assert sorted(len(v) for v in settled.values()) == [3, 3, 3]
    assert sorted(name for names in settled.values() for name in names) == sorted(NAMES)


def test_nothing_moves_when_every_runner_is_within_its_share() -> None:
    held = {1: NAMES[:3], 2: NAMES[3:6], 3: NAMES[6:]}
    view = View(held={r: 3 for r in held})
    assert all(placement.handoff(r, held[r], view, 9) is None for r in held)


def test_a_slow_runner_missing_from_the_view_causes_no_handoff() -> None:
    # Runner 3 missed a heartbeat: the others' share grows, so they keep what they hold.
    view = View(held={1: 3, 2: 3})
    assert placement.handoff(1, NAMES[:3], view, 9) is None


def test_cap_is_fair_share_plus_slack() -> None:
    assert placement.may_take(1, View(held={1: 3, 2: 3}), 9)  # share 5
    assert not placement.may_take(1, View(held={1: 4, 2: 3, 3: 2}), 9)  # share 3, slack 1


def test_after_a_runner_dies_the_survivors_may_take_everything() -> None:
    view = View(held={1: 3, 2: 3})
    assert placement.fair_share(9, 2) + placement.SLACK >= 5
    assert placement.may_take(1, view, 9) and placement.may_take(2, view, 9)
