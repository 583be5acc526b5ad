"""The run ledger against the real test database: one row per (schedule, tick), recorded
fenced on the beat lease's term, and the moves workers and operators make on those rows."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cluster_singletons.beat import ledger, schedule_records
from cluster_singletons.beat.ledger import Intent
from cluster_singletons.cluster import leases, membership
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.errors import LeadershipLost
from cluster_singletons.models import Lease, Run, ScheduleRecord
from tests.beat.test_engine import T0

pytestmark = [pytest.mark.db, pytest.mark.django_db]

#: Long before any tick of these tests: an expired lease, an old row.
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _intent(seconds: float, schedule: str = "beat:a", **fields: Any) -> Intent:
    return Intent(schedule=schedule, tick=_at(seconds), task="t.tick", **fields)


def _record(
    *intents: Intent, last_ticks: dict[str, datetime] | None = None, term: Term | None = None
) -> list[Run]:
    return ledger.record(intents, last_ticks=last_ticks or {}, term=term, using="default", ttl=10)


def _row(schedule: str, seconds: float) -> Run:
    return Run.objects.get(schedule=schedule, tick=_at(seconds))


def _runner(host: str = "t") -> int:
    return membership.register(host=host, pid=1, kind="beat", using="default")


def _with_status(status: str, seconds: float = 10, schedule: str = "beat:a") -> Run:
    """A recorded run of ``schedule`` at ``seconds`` moved straight to ``status``."""
    _record(_intent(seconds, schedule))
    Run.objects.filter(schedule=schedule, tick=_at(seconds)).update(status=status)
    return _row(schedule, seconds)


@pytest.fixture
def term() -> Term:
    """A current term of the ``beat`` lease."""
    leases.ensure(["beat"], using="default")
    taken = leases.acquire("beat", _runner(), ttl=10, using="default")
    assert taken is not None
    return taken


def test_task_id_is_deterministic_differs_per_tick_and_is_the_recorded_id() -> None:
    first = ledger.task_id("beat:a", _at(10))
    assert first == ledger.task_id("beat:a", _at(10))
    assert uuid.UUID(first).version == 5
    assert first != ledger.task_id("beat:a", _at(20)), "another tick: another run"
    assert first != ledger.task_id("beat:b", _at(10)), "another schedule: another run"
    _record(_intent(10), _intent(20, status=Run.Status.SKIPPED, reason="overlap"))
    assert _row("beat:a", 10).task_id == first
    skipped = _row("beat:a", 20)
    assert (skipped.task_id, skipped.message) == ("", ""), "a skipped tick dispatches nothing"


def test_record_inserts_the_intents_and_upserts_each_schedules_last_tick(term: Term) -> None:
    ScheduleRecord.objects.create(
        key="beat:a", last_tick=_at(-3600), paused=True, pause_note="maintenance"
    )
    created = _record(
        _intent(10, args=[1, "x"], kwargs={"k": 2}, options={"queue": "q"}),
        _intent(10, "beat:b"),
        last_ticks={"beat:a": _at(10), "beat:b": _at(10)},
        term=term,
    )
    assert sorted((r.schedule, r.tick) for r in created) == [
        ("beat:a", _at(10)),
        ("beat:b", _at(10)),
    ]
    row = _row("beat:a", 10)
    assert (row.status, row.epoch, row.task) == (Run.Status.PENDING, term.epoch, "t.tick")
    assert ledger.message(row) == {"args": [1, "x"], "kwargs": {"k": 2}, "options": {"queue": "q"}}
    assert json.loads(row.message) == ledger.message(row)
    kept = ScheduleRecord.objects.get(key="beat:a")
    assert kept.last_tick == _at(10)
    assert (kept.paused, kept.pause_note) == (True, "maintenance"), "only last_tick moves"
    new = ScheduleRecord.objects.get(key="beat:b")
    assert (new.last_tick, new.paused, new.problem) == (_at(10), False, "")


def test_an_intent_whose_tick_is_recorded_is_left_out_and_the_rest_are_inserted(
    term: Term,
) -> None:
    _record(_intent(10, status=Run.Status.SKIPPED, reason="by a backfill"))
    created = _record(
        _intent(10),
        _intent(20),
        _intent(10, "beat:b"),
        last_ticks={"beat:a": _at(20)},
        term=term,
    )
    assert sorted((r.schedule, r.tick) for r in created) == [
        ("beat:a", _at(20)),
        ("beat:b", _at(10)),
    ]
    clashed = Run.objects.get(schedule="beat:a", tick=_at(10))
    assert (clashed.status, clashed.reason) == (Run.Status.SKIPPED, "by a backfill")
    assert Run.objects.count() == 3
    assert _row("beat:a", 20).status == Run.Status.PENDING
    assert ScheduleRecord.objects.get(key="beat:a").last_tick == _at(20)


def _taken_over(term: Term) -> None:
    Lease.objects.filter(name="beat").update(expires_at=LONG_AGO)
    successor = leases.acquire("beat", _runner("other"), ttl=10, using="default")
    assert successor is not None and successor.epoch == term.epoch + 1


def _released(term: Term) -> None:
    assert leases.release(term.runner_id, using="default") == ["beat"]


def _expired(term: Term) -> None:
    Lease.objects.filter(name="beat").update(expires_at=LONG_AGO)


@pytest.mark.parametrize(
    "end_term", [_taken_over, _released, _expired], ids=["taken-over", "released", "expired"]
)
def test_a_term_no_longer_current_raises_leadership_lost_and_records_nothing(
    term: Term, end_term: Callable[[Term], None]
) -> None:
    ScheduleRecord.objects.create(key="beat:a", last_tick=_at(0))
    end_term(term)
    with pytest.raises(LeadershipLost):
        _record(
            _intent(10),
            _intent(10, "beat:b"),
            last_ticks={"beat:a": _at(10), "beat:b": _at(10)},
            term=term,
        )
    assert Run.objects.count() == 0
    assert dict(ScheduleRecord.objects.values_list("key", "last_tick")) == {"beat:a": _at(0)}


def test_record_without_a_term_is_unfenced(term: Term) -> None:
    _released(term)  # nobody leads: an operator's run now still records
    created = _record(_intent(10, kind=Run.Kind.MANUAL), last_ticks={"beat:a": _at(10)})
    assert [r.tick for r in created] == [_at(10)]
    row = _row("beat:a", 10)
    assert (row.status, row.kind, row.epoch) == (Run.Status.PENDING, Run.Kind.MANUAL, None)
    assert ScheduleRecord.objects.get(key="beat:a").last_tick == _at(10)


def test_mark_published_moves_only_pending_rows_and_stamps_published_at() -> None:
    _record(_intent(10), _intent(20), _intent(30))
    started = _with_status(Run.Status.STARTED, 40)  # a worker reported before the leader
    sent, untouched = _row("beat:a", 10), _row("beat:a", 20)
    ledger.mark_published([sent.task_id, started.task_id], at=_at(11), using="default")
    sent.refresh_from_db()
    assert (sent.status, sent.published_at) == (Run.Status.PUBLISHED, _at(11))
    started.refresh_from_db()
    assert (started.status, started.published_at) == (Run.Status.STARTED, None)
    untouched.refresh_from_db()
    assert (untouched.status, untouched.published_at) == (Run.Status.PENDING, None)


def test_fail_turns_pending_rows_into_errors_with_the_reason() -> None:
    _record(_intent(10), _intent(20))
    doomed, sent = _row("beat:a", 10), _row("beat:a", 20)
    ledger.mark_published([sent.task_id], at=_at(20), using="default")
    ledger.fail({doomed.task_id: "bad options", sent.task_id: "bad options"}, using="default")
    doomed.refresh_from_db()
    assert (doomed.status, doomed.reason) == (Run.Status.ERROR, "bad options")
    assert doomed.finished_at is not None
    sent.refresh_from_db()
    assert (sent.status, sent.reason, sent.finished_at) == (Run.Status.PUBLISHED, "", None)


def test_pending_returns_the_pending_rows_due_by_until_oldest_first() -> None:
    _record(_intent(10), _intent(20), _intent(5), _intent(30), _intent(1))
    ledger.mark_published([_row("beat:a", 1).task_id], at=_at(1), using="default")
    # Recorded in this order, whatever their ticks: 20 s, then 5 s, then 10 s.
    for seconds, created in ((20, 1), (5, 2), (10, 3), (30, 4), (1, 0)):
        Run.objects.filter(tick=_at(seconds)).update(created_at=_at(created))
    due = ledger.pending(until=_at(20), using="default")
    assert [r.tick for r in due] == [_at(20), _at(5), _at(10)]
    assert [r.tick for r in ledger.pending(until=_at(20), using="default", limit=2)] == [
        _at(20),
        _at(5),
    ]


def test_finished_names_the_runs_that_finished_or_are_gone() -> None:
    ids = {
        status: _with_status(status, seconds).task_id
        for seconds, status in enumerate(
            [
                Run.Status.PENDING,
                Run.Status.PUBLISHED,
                Run.Status.STARTED,
                Run.Status.SUCCEEDED,
                Run.Status.FAILED,
                Run.Status.ERROR,
            ]
        )
    }
    gone = ledger.task_id("beat:a", _at(-1))
    assert ledger.finished([*ids.values(), gone], using="default") == {
        ids[Run.Status.SUCCEEDED],
        ids[Run.Status.FAILED],
        ids[Run.Status.ERROR],
        gone,
    }
    assert ledger.finished([], using="default") == set()


@pytest.mark.parametrize(
    ("before", "reported", "after"),
    [
        (Run.Status.PENDING, Run.Status.STARTED, Run.Status.STARTED),
        (Run.Status.PUBLISHED, Run.Status.STARTED, Run.Status.STARTED),
        (Run.Status.STARTED, Run.Status.SUCCEEDED, Run.Status.SUCCEEDED),
        (Run.Status.PUBLISHED, Run.Status.FAILED, Run.Status.FAILED),
        (Run.Status.SUCCEEDED, Run.Status.STARTED, Run.Status.SUCCEEDED),
        (Run.Status.FAILED, Run.Status.STARTED, Run.Status.FAILED),
        (Run.Status.SUCCEEDED, Run.Status.FAILED, Run.Status.SUCCEEDED),
        (Run.Status.ERROR, Run.Status.SUCCEEDED, Run.Status.ERROR),
    ],
)
def test_report_moves_a_run_forward_and_never_reopens_a_finished_one(
    before: str, reported: str, after: str
) -> None:
    run = _with_status(before)
    changed = ledger.report(run.task_id, reported, using="default")
    run.refresh_from_db()
    assert run.status == after
    assert changed == (1 if before != after else 0)
    assert (run.finished_at is not None) == (changed == 1 and after in Run.FINISHED)


def test_report_on_an_unknown_task_id_changes_nothing() -> None:
    run = _with_status(Run.Status.PUBLISHED)
    assert (
        ledger.report(ledger.task_id("beat:a", _at(-1)), Run.Status.STARTED, using="default") == 0
    )
    run.refresh_from_db()
    assert run.status == Run.Status.PUBLISHED


def test_prune_deletes_rows_created_before_the_cutoff_but_keeps_pending_ones() -> None:
    for seconds, status in enumerate(
        [Run.Status.PENDING, Run.Status.PUBLISHED, Run.Status.SUCCEEDED, Run.Status.ERROR]
    ):
        _with_status(status, seconds)
    _record(_intent(0, status=Run.Status.SKIPPED, reason="overlap", schedule="beat:b"))
    _with_status(Run.Status.SUCCEEDED, 10, schedule="beat:c")
    Run.objects.exclude(schedule="beat:c").update(created_at=LONG_AGO)
    Run.objects.filter(schedule="beat:c").update(created_at=T0)
    assert ledger.prune(before=T0 - timedelta(days=1), using="default") == 4
    assert sorted(Run.objects.values_list("schedule", "status")) == [
        ("beat:a", Run.Status.PENDING),
        ("beat:c", Run.Status.SUCCEEDED),
    ]


def test_revive_skipped_turns_only_skipped_rows_of_the_intents_ticks_into_them() -> None:
    _record(
        _intent(10, status=Run.Status.SKIPPED, reason="overlap"),
        _intent(20, status=Run.Status.SKIPPED, reason="overlap"),
    )
    published = _with_status(Run.Status.PUBLISHED, 30)
    revived = ledger.revive_skipped(
        [
            _intent(10, kind=Run.Kind.BACKFILL, args=["again"]),
            _intent(30, kind=Run.Kind.BACKFILL),
            _intent(40, kind=Run.Kind.BACKFILL),
        ],
        using="default",
    )
    assert revived == 1
    row = _row("beat:a", 10)
    assert (row.status, row.kind, row.reason, row.epoch) == (
        Run.Status.PENDING,
        Run.Kind.BACKFILL,
        "",
        None,
    )
    assert row.task_id == ledger.task_id("beat:a", _at(10))
    assert ledger.message(row)["args"] == ["again"]
    assert _row("beat:a", 20).status == Run.Status.SKIPPED, "not asked for"
    published.refresh_from_db()
    assert (published.status, published.kind) == (Run.Status.PUBLISHED, Run.Kind.SCHEDULED)
    assert not Run.objects.filter(tick=_at(40)).exists(), "revives rows, creates none"


def test_paused_names_the_paused_schedules() -> None:
    """``paused`` (now in ``schedule_records``) reads the records the ledger upserts."""
    schedule_records.set_paused("beat:a", "maintenance", using="default")
    schedule_records.set_paused("beat:b", "for a while", using="default")
    schedule_records.set_paused("beat:b", None, using="default")  # resumed
    _record(_intent(10, "beat:c"), last_ticks={"beat:c": _at(10)})
    assert schedule_records.operator_settings(using="default")[0] == frozenset({"beat:a"})


def test_pending_count_counts_only_the_rows_waiting_to_be_published() -> None:
    assert ledger.pending_count(using="default") == 0
    _record(_intent(10), _intent(20), _intent(30), _intent(40, status=Run.Status.SKIPPED))
    ledger.mark_published([_row("beat:a", 10).task_id], at=_at(10), using="default")
    assert ledger.pending_count(using="default") == 2
