"""Placement policy as pure functions, with properties checked over random views."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster import placement
from cluster_singletons.cluster.placement import View

pytestmark = pytest.mark.unit

NAMES = [f"singleton:s{i}" for i in range(9)]


def _round(held: dict[int, list[str]], total: int) -> dict[int, list[str]]:
    """Every runner hands off what placement proposes on the same view, and each target
    takes what it was handed: one renewal of the whole cluster."""
    view = View(held={r: len(v) for r, v in held.items()})
    after = {r: list(v) for r, v in held.items()}
    for me, mine in held.items():
        for name, target in placement.handoff(me, mine, view, total):
            after[me].remove(name)
            after[target].append(name)
    return after


def test_fair_share_rounds_up() -> None:
    assert [placement.fair_share(9, n) for n in (1, 2, 3, 4)] == [9, 5, 3, 3]


def test_ranking_is_stable_and_independent_of_order() -> None:
    assert placement.ranking("a", [1, 2, 3]) == placement.ranking("a", [3, 1, 2])
    assert len({tuple(placement.ranking(n, [1, 2, 3])) for n in NAMES}) > 1


def test_a_runner_counted_above_its_share_while_holding_nothing_hands_off_nothing() -> None:
    # The database still counts leases it stepped down from (not yet released).
    assert placement.handoff(1, [], View(held={1: 5, 2: 0}), 5) == []


def test_a_runner_hands_off_its_whole_excess_in_one_renewal() -> None:
    proposals = placement.handoff(1, NAMES, View(held={1: 9, 2: 0, 3: 0}), 9)
    assert len(proposals) == 6
    assert Counter(target for _, target in proposals) == {2: 3, 3: 3}


def test_a_joining_runner_receives_its_share_in_one_round() -> None:
    settled = _round({1: NAMES[:5], 2: NAMES[5:], 3: []}, len(NAMES))
    assert sorted(len(v) for v in settled.values()) == [3, 3, 3]
    assert sorted(name for names in settled.values() for name in names) == sorted(NAMES)


def test_nothing_moves_when_every_runner_is_within_its_share() -> None:
    held = {1: NAMES[:3], 2: NAMES[3:6], 3: NAMES[6:]}
    view = View(held={r: 3 for r in held})
    assert all(placement.handoff(r, held[r], view, 9) == [] for r in held)


def test_a_slow_runner_missing_from_the_view_causes_no_handoff() -> None:
    # Runner 3 missed a heartbeat: the others' share grows, so they keep what they hold.
    view = View(held={1: 3, 2: 3})
    assert placement.handoff(1, NAMES[:3], view, 9) == []


def test_cap_is_fair_share_plus_slack() -> None:
    assert placement.may_take(1, View(held={1: 3, 2: 3}), 9)  # share 5
    assert not placement.may_take(1, View(held={1: 4, 2: 3, 3: 2}), 9)  # share 3, slack 1


def test_after_a_runner_dies_the_survivors_may_take_everything() -> None:
    view = View(held={1: 3, 2: 3})
    assert placement.fair_share(9, 2) + placement.SLACK >= 5
    assert placement.may_take(1, view, 9) and placement.may_take(2, view, 9)


def test_a_runner_at_its_share_leaves_a_free_lease_to_one_below_it_for_a_while() -> None:
    view = View(held={1: 3, 2: 3, 3: 2})  # share 3; runner 3 is a handoff's target
    assert not placement.may_take(1, view, 9, free_for=2.9, patience=3.0)
    assert placement.may_take(1, view, 9, free_for=3.0, patience=3.0)  # nobody took it
    assert placement.may_take(3, view, 9, free_for=0.0, patience=3.0)
    # Nobody below its share: the slack is for a runner that died and is still counted.
    assert placement.may_take(1, View(held={1: 3, 2: 3, 3: 3}), 9, free_for=0.0, patience=3.0)


def test_a_lease_counts_as_free_for_as_long_as_consecutive_polls_found_it_free() -> None:
    clock = FrozenClock()
    placed = placement.Placed("singleton:", NAMES, clock=clock, patience=3.0, poll_every=0.5)
    placed.view = View(held={1: 3, 2: 3, 3: 2})
    for _ in range(6):  # found free at every poll, 0.5 s apart
        assert not placed.may_take(1, NAMES[0])
        clock.advance(0.5)
    assert placed.may_take(1, NAMES[0])
    clock.advance(5.0)  # polls in between found it held: a new spell of being free
    assert not placed.may_take(1, NAMES[0])


# -- properties over random views ----------------------------------------------------------

runner_ids = st.integers(min_value=1, max_value=12)


@st.composite
def views(draw: st.DrawFn) -> tuple[int, list[str], View, int]:
    """(me, the names me leads, a view, the total): me may hold nothing, be missing from
    the view, or be counted by the view differently from what it leads; runners may hold
    nothing; the total may be below the number of runners."""
    total = draw(st.integers(min_value=0, max_value=40))
    names = [f"singleton:n{i}" for i in range(total)]
    me = draw(runner_ids)
    mine = draw(st.lists(st.sampled_from(names), unique=True) if names else st.just([]))
    others = draw(st.dictionaries(runner_ids.filter(lambda r: r != me), st.integers(0, 45)))
    held = dict(others)
    if draw(st.booleans()):  # me is in the view, counted as the database counts it
        held[me] = draw(st.sampled_from([len(mine), *range(0, 46)]))
    return me, mine, View(held=held), total


@given(views())
def test_handoff_invariants_over_random_views(case: tuple[int, list[str], View, int]) -> None:
    me, mine, view, total = case
    proposals = placement.handoff(me, mine, view, total)
    live = set(view.held) | {me}
    share = placement.fair_share(total, len(live))
    names = [name for name, _ in proposals]
    assert len(names) == len(set(names)), "a name handed off twice"
    assert set(names) <= set(mine), "handed off a lease it does not lead"
    # Only the excess over the share, so a runner at or below its share moves nothing.
    assert len(proposals) <= max(0, len(mine) - share)
    given_to = Counter(target for _, target in proposals)
    for target, n in given_to.items():
        assert target in view.held and target != me, "handed to a runner not live"
        assert view.held[target] + n <= share, "pushed a target above its share"
    if any(n > share for r, n in view.held.items() if r != me):
        return  # the room is shared with the others above their share: see the next test
    # Alone above its share, a runner fills the room below it, up to its excess...
    room = sum(max(0, share - n) for r, n in view.held.items() if r != me)
    assert len(proposals) == min(max(0, len(mine) - share), room)
    # ...and assignments follow the hash: a runner ranked above the target had no room left.
    left = {r: share - view.held[r] - given_to[r] for r in view.held if r != me}
    for name, target in proposals:
        order = placement.ranking(name, live - {me})
        for better in order[: order.index(target)]:
            assert left[better] <= 0, f"{name} skipped runner {better}, which had room"


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[int, list[str]], int]:
    """Leases spread over runners any way at all, some runners holding none."""
    total = draw(st.integers(min_value=0, max_value=60))
    runners = draw(st.lists(runner_ids, min_size=1, max_size=8, unique=True))
    owner = draw(st.lists(st.sampled_from(runners), min_size=total, max_size=total))
    held: dict[int, list[str]] = {r: [] for r in runners}
    for i, r in enumerate(owner):
        held[r].append(f"singleton:n{i}")
    return held, total


@given(clusters())
def test_one_round_on_a_shared_view_settles_any_spread(
    cluster: tuple[dict[int, list[str]], int],
) -> None:
    held, total = cluster
    after = _round(held, total)
    share = placement.fair_share(total, len(held))
    assert sorted(n for v in after.values() for n in v) == sorted(
        n for v in held.values() for n in v
    )
    assert max(len(v) for v in after.values()) <= share, "not settled in one round"
    assert _round(after, total) == after, "a settled cluster moved again"


@given(clusters())
def test_runners_within_their_share_never_move(cluster: tuple[dict[int, list[str]], int]) -> None:
    held, total = cluster
    share = placement.fair_share(total, len(held))
    view = View(held={r: len(v) for r, v in held.items()})
    for me, mine in held.items():
        if len(mine) <= share:
            assert placement.handoff(me, mine, view, total) == []
