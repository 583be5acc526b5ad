"""A slot as the coordinator's decisions see it."""

from __future__ import annotations

import threading

import pytest
from django.db import OperationalError

from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import Leadership, idle
from cluster_singletons.cluster.slot import Slot

pytestmark = pytest.mark.unit


def _ended(outcome: str, *, stopped: bool = False) -> Slot:
    slot = Slot(name="x", work=idle, term=Term(name="x", runner_id=1, epoch=1))
    slot.thread = threading.Thread(target=lambda: None)
    slot.thread.start()
    slot.thread.join()
    slot.outcome = outcome  # type: ignore[assignment]
    if stopped:
        slot.stop_event.set()
    return slot


@pytest.mark.parametrize("outcome", ["returned", "failed", "fenced-out"])
def test_work_that_ended_on_its_own_during_its_term_is_reported(outcome: str) -> None:
    state = _ended(outcome).state()
    assert (state.leading, state.working, state.ended) == (True, False, outcome)


def test_work_stopped_by_the_runner_or_awaiting_a_restart_is_not_reported_again() -> None:
    assert _ended("returned", stopped=True).state().ended is None
    waiting = _ended("failed")
    waiting.restart_at = 5.0
    assert waiting.state().ended is None


def test_a_standing_slot_is_not_leading() -> None:
    state = Slot(name="x", work=idle, next_acquire=3.0).state()
    assert (state.leading, state.next_acquire, state.ended) == (False, 3.0, None)


@pytest.mark.parametrize(
    ("error", "traceback"),
    [(OperationalError("server closed the connection"), False), (KeyError("x"), True)],
)
def test_work_ended_by_a_database_error_logs_one_line_other_errors_a_traceback(
    error: Exception, traceback: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def work(leadership: Leadership) -> None:
        raise error

    slot = Slot(name="x", work=work, term=Term(name="x", runner_id=1, epoch=1))
    ended = threading.Event()
    slot.start_work(using="default", ttl=10, clock=FrozenClock(), on_end=ended.set)
    assert ended.wait(5)
    assert slot.outcome == "failed"
    (record,) = [r for r in caplog.records if "leader work for 'x'" in r.getMessage()]
    assert (record.exc_info is not None) == traceback
    if not traceback:
        assert "server closed the connection" in record.getMessage()
