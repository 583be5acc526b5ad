"""The coordinator's decisions, with plain values: no database, no threads, no clock."""

from __future__ import annotations

import pytest

from cluster_singletons.cluster.decisions import (
    SlotState,
    Timers,
    decide,
    lost_in_renewal,
    next_wake,
)
from cluster_singletons.conf import ClusterSettings

pytestmark = pytest.mark.unit

SETTINGS = ClusterSettings(lease_ttl=10, renew_interval=3, acquire_interval=0.5, retry_backoff=1)
LATER = Timers(heartbeat=1e9, prune=1e9)


def leading(name: str = "a", **kwargs: object) -> SlotState:
    return SlotState(name=name, leading=True, believed_until=100.0, **kwargs)  # type: ignore[arg-type]


def standing(name: str, next_acquire: float) -> SlotState:
    return SlotState(name=name, leading=False, next_acquire=next_acquire)


def test_a_term_is_given_up_once_its_belief_window_closes() -> None:
    assert decide([leading()], LATER, 99.9, SETTINGS, may_lead=True).give_up == []
    plan = decide([leading()], LATER, 100.0, SETTINGS, may_lead=True)
    assert plan.give_up == [("a", "lease not renewed in time")]


def test_work_refused_a_fenced_write_ends_the_term_at_once() -> None:
    plan = decide([leading(ended="fenced-out")], LATER, 50.0, SETTINGS, may_lead=True)
    assert plan.give_up == [("a", "a fenced write was refused")]
    assert plan.restart_at == {} and plan.idle == []


def test_failed_work_restarts_after_a_backoff_that_doubles_with_its_crashes() -> None:
    delays = [
        decide(
            [leading(ended="failed", crashes=n)], LATER, 50.0, SETTINGS, may_lead=True
        ).restart_at["a"]
        - 50.0
        for n in range(6)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # capped at retry_backoff_max


def test_returned_work_holds_the_lease_idle() -> None:
    plan = decide([leading(ended="returned")], LATER, 50.0, SETTINGS, may_lead=True)
    assert plan.idle == ["a"] and plan.give_up == [] and plan.restart_at == {}


def test_work_is_restarted_when_its_time_comes_unless_the_term_is_given_up() -> None:
    due = leading(restart_at=40.0)
    assert decide([due], LATER, 39.0, SETTINGS, may_lead=True).restart == []
    assert decide([due], LATER, 40.0, SETTINGS, may_lead=True).restart == ["a"]
    assert decide([due], LATER, 100.0, SETTINGS, may_lead=True).restart == []


def test_renewal_and_pruning_follow_their_timers() -> None:
    timers = Timers(heartbeat=10.0, prune=20.0)
    assert decide([], timers, 9.0, SETTINGS, may_lead=True).renew is False
    plan = decide([], timers, 10.0, SETTINGS, may_lead=True)
    assert (plan.renew, plan.prune) == (True, False)
    plan = decide([], timers, 20.0, SETTINGS, may_lead=True)
    assert (plan.renew, plan.prune) == (True, True)


def test_standing_leases_due_within_half_an_interval_are_polled_together() -> None:
    slots = [standing("now", 10.0), standing("soon", 10.2), standing("later", 10.3)]
    plan = decide(slots, LATER, 10.0, SETTINGS, may_lead=True)
    assert plan.poll == ["now", "soon"]


def test_nothing_is_polled_before_any_standing_lease_is_due() -> None:
    plan = decide([standing("soon", 10.2)], LATER, 10.0, SETTINGS, may_lead=True)
    assert plan.poll == []


def test_a_runner_that_may_not_lead_neither_polls_nor_releases() -> None:
    plan = decide([standing("now", 10.0)], LATER, 10.0, SETTINGS, may_lead=False)
    assert plan.poll == [] and plan.release is False


def test_a_lease_whose_old_work_still_runs_is_not_polled() -> None:
    busy = SlotState(name="busy", leading=False, next_acquire=0.0, working=True)
    assert decide([busy], LATER, 10.0, SETTINGS, may_lead=True).poll == []


def test_a_renewal_that_left_a_term_out_ends_that_term() -> None:
    assert lost_in_renewal(["a", "b", "c"], {"b"}) == ["a", "c"]


def test_the_next_pass_is_due_at_the_first_deadline() -> None:
    slots = [leading(restart_at=70.0), standing("b", 55.0)]
    assert next_wake(slots, Timers(heartbeat=60.0, prune=80.0)) == 55.0
    assert next_wake(slots, Timers(heartbeat=50.0, prune=80.0)) == 50.0
    assert next_wake([leading()], Timers(heartbeat=200.0, prune=300.0)) == 100.0
