"""The leading beat's outbox against the real test database and kombu's in-memory broker:
messages are built when runs are added, published when due, and what the broker received
is what is counted."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish
from kombu import serialization
from kombu.exceptions import OperationalError
from kombu.transport import memory

from cluster_singletons.beat import ledger, outbox
from cluster_singletons.beat.ledger import Intent
from cluster_singletons.beat.outbox import Outbox
from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster import leases, membership
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.models import Run
from tests.beat.test_engine import T0, _drain

# The ``app`` fixture (kombu's in-memory broker, queue ``beat-test``) is test_engine's,
# imported by tests/beat/conftest.py.
pytestmark = [pytest.mark.db, pytest.mark.django_db]


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def term() -> Term:
    leases.ensure(["beat"], using="default")
    runner = membership.register(host="t", pid=1, kind="beat", using="default")
    taken = leases.acquire("beat", runner, ttl=10, using="default")
    assert taken is not None
    return taken


@pytest.fixture
def leadership(term: Term) -> Leadership:
    return Leadership(term=term, stop_event=threading.Event(), using="default", ttl=10)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(wall=T0)


@pytest.fixture
def handed() -> list[list[Run]]:
    """What ``after_publish`` was called with, call by call."""
    return []


@pytest.fixture
def box(app: Celery, clock: FrozenClock, handed: list[list[Run]]) -> Iterator[Outbox]:
    made = Outbox(app, using="default", clock=clock, after_publish=handed.append)
    yield made
    made.close()


def _runs(term: Term, *seconds: float, schedule: str = "beat:ten", **options: Any) -> list[Run]:
    """Record a run of ``schedule`` per tick (``T0 + seconds``) fenced on ``term``."""
    intents = [
        Intent(schedule=schedule, tick=_at(s), task="t.tick", args=[schedule], options=options)
        for s in seconds
    ]
    return ledger.record(intents, last_ticks={}, term=term, using="default", ttl=10)


def _ids(runs: list[Run]) -> list[str]:
    return [r.task_id for r in runs]


def _status(run: Run) -> tuple[str, datetime | None]:
    row = Run.objects.get(task_id=run.task_id)
    return row.status, row.published_at


def test_add_builds_the_messages_and_publishes_nothing(
    app: Celery, box: Outbox, term: Term
) -> None:
    built: list[str] = []

    def count(headers: dict[str, Any], **_: Any) -> None:
        built.append(headers["id"])

    runs = _runs(term, 20, 10)
    before_task_publish.connect(count, weak=False)
    try:
        assert box.add(runs, term, {}) is True
    finally:
        before_task_publish.disconnect(count)
    assert sorted(built) == sorted(_ids(runs)), "Celery's send_task ran for each run, now"
    assert _drain(app) == [], "nothing reaches the broker before publish_due"
    assert box.task_ids == set(_ids(runs))
    assert box.next_at == _at(10)
    assert [_status(r) for r in runs] == [(Run.Status.PENDING, None)] * 2


def test_publish_due_publishes_the_due_runs_by_tick_and_marks_them_at_the_flush_time(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    clock: FrozenClock,
    handed: list[list[Run]],
) -> None:
    later, first, second = _runs(term, 30, 10, 20)
    box.add([later, first, second], term, {})
    clock.advance(21)  # the flush happens a second after the tick publish_due is told of
    assert box.publish_due(_at(20), leadership) is True
    sent = _drain(app)
    assert [h["id"] for h in sent] == [first.task_id, second.task_id], "due ones, by tick"
    assert sent[0]["cluster_context"]["epoch"] == term.epoch
    assert _status(first) == _status(second) == (Run.Status.PUBLISHED, _at(21))
    assert _status(later) == (Run.Status.PENDING, None)
    assert [_ids(call) for call in handed] == [[first.task_id, second.task_id]]
    assert (box.task_ids, box.next_at) == ({later.task_id}, _at(30))

    clock.advance(9)
    assert box.publish_due(_at(30), leadership) is True
    assert [h["id"] for h in _drain(app)] == [later.task_id]
    assert _status(later) == (Run.Status.PUBLISHED, _at(30))
    assert (box.task_ids, box.next_at) == (set(), None)


def test_due_runs_go_out_in_batches_each_marked_published(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    handed: list[list[Run]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox, "BATCH", 2)
    marked: list[list[str]] = []
    mark = ledger.mark_published

    def spy(task_ids: list[str], **kwargs: Any) -> None:
        marked.append(list(task_ids))
        mark(task_ids, **kwargs)

    monkeypatch.setattr(ledger, "mark_published", spy)
    runs = _runs(term, 1, 2, 3, 4, 5)
    box.add(runs, term, {})
    assert box.publish_due(_at(5), leadership) is True
    assert [h["id"] for h in _drain(app)] == _ids(runs)
    ids = _ids(runs)
    assert marked == [ids[0:2], ids[2:4], ids[4:5]]
    assert [_ids(call) for call in handed] == [ids], "after_publish once, after all batches"


@pytest.fixture
def strict_json() -> Iterator[str]:
    """A serializer that refuses what is not strict JSON (``NaN``)."""
    serialization.register(
        "strict-json",
        lambda obj: json.dumps(obj, allow_nan=False),
        json.loads,
        content_type="application/x-strict-json",
        content_encoding="utf-8",
    )
    yield "strict-json"
    serialization.unregister("strict-json")


def _nan_argument(term: Term, serializer: str) -> list[Run]:
    intent = Intent(
        schedule="beat:bad",
        tick=_at(10),
        task="t.tick",
        args=[float("nan")],
        options={"serializer": serializer},
    )
    return ledger.record([intent], last_ticks={}, term=term, using="default", ttl=10)


@pytest.mark.parametrize(
    ("bad_run", "because"),
    [
        # Celery cannot parse the expiry when it builds the message.
        (lambda term, _: _runs(term, 10, schedule="beat:bad", expires="not a date"), "ValueError"),
        # kombu has no such serializer.
        (
            lambda term, _: _runs(term, 10, schedule="beat:bad", serializer="no-such-serializer"),
            "SerializerNotInstalled",
        ),
        # The run's serializer cannot encode its argument.
        (_nan_argument, "EncodeError"),
    ],
    ids=["celery-rejects-options", "kombu-rejects-options", "unserializable-argument"],
)
def test_a_run_whose_message_cannot_be_built_is_an_error_row_and_the_rest_are_published(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    strict_json: str,
    bad_run: Callable[[Term, str], list[Run]],
    because: str,
) -> None:
    first, second = _runs(term, 10, 10.5)
    (bad,) = bad_run(term, strict_json)
    assert box.add([first, bad, second], term, {}) is True
    row = Run.objects.get(task_id=bad.task_id)
    assert row.status == Run.Status.ERROR
    assert row.reason.startswith(f"message cannot be built: {because}: ")
    assert row.finished_at is not None
    assert box.task_ids == {first.task_id, second.task_id}
    assert box.publish_due(_at(11), leadership) is True
    assert [h["id"] for h in _drain(app)] == [first.task_id, second.task_id]
    assert _status(first)[0] == _status(second)[0] == Run.Status.PUBLISHED


def test_a_run_whose_compression_kombu_rejects_is_an_error_row_and_the_rest_are_published(
    app: Celery, box: Outbox, term: Term, leadership: Leadership
) -> None:
    first, second = _runs(term, 10, 10.5)
    (bad,) = _runs(term, 10, schedule="beat:bad", compression="no-such-codec")
    box.add([first, bad, second], term, {})
    box.publish_due(_at(11), leadership)
    assert [h["id"] for h in _drain(app)] == [first.task_id, second.task_id]
    assert Run.objects.get(task_id=bad.task_id).status == Run.Status.ERROR


def _refuse_from(monkeypatch: pytest.MonkeyPatch, *, accepted: int) -> None:
    """The in-memory broker takes ``accepted`` messages, then refuses every other one."""
    put = memory.Channel._put
    taken = 0

    def refusing(self: memory.Channel, queue: str, message: Any, **kwargs: Any) -> None:
        nonlocal taken
        if taken >= accepted:
            raise OperationalError("the broker refuses")
        taken += 1
        put(self, queue, message, **kwargs)

    monkeypatch.setattr(memory.Channel, "_put", refusing)


def test_a_batch_the_broker_refuses_stays_pending_and_the_outbox_is_emptied(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    handed: list[list[Run]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _runs(term, 10, 20, 30)
    # Its own patch, undone alone: undoing the fixture's would bring CELERY_BROKER_URL back.
    with pytest.MonkeyPatch.context() as refusing:
        _refuse_from(refusing, accepted=0)
        assert box.add(runs, term, {}) is True, "building messages needs no broker round trip"
        assert box.publish_due(_at(20), leadership) is False
    assert (box.task_ids, box.next_at) == (set(), None), "even the run not yet due"
    assert [_status(r) for r in runs] == [(Run.Status.PENDING, None)] * 3
    assert handed == []
    assert _drain(app) == []


def test_a_batch_refused_midway_stays_pending_and_is_republished_under_the_same_ids(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _runs(term, 10, 20)
    box.add(runs, term, {})
    with pytest.MonkeyPatch.context() as refusing:  # undone alone, as above
        _refuse_from(refusing, accepted=1)
        assert box.publish_due(_at(20), leadership) is False
    assert ledger.pending_count(using="default") == 2, "kombu cannot tell what got through"
    # The broker is back: the engine republishes what is pending.
    again = ledger.pending(until=_at(20), using="default")
    assert box.add(again, term, {}) is True
    assert box.publish_due(_at(20), leadership) is True
    ids = _ids(runs)
    assert [h["id"] for h in _drain(app)] == [ids[0], *ids], "a duplicate, the same task id"
    assert ledger.pending_count(using="default") == 0


def test_add_returns_false_and_keeps_nothing_when_the_broker_cannot_be_asked(
    app: Celery, box: Outbox, term: Term, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("the broker is unreachable")

    runs = _runs(term, 10)
    monkeypatch.setattr(app, "producer_or_acquire", unreachable)
    assert box.add(runs, term, {}) is False
    assert box.task_ids == set()
    assert _status(runs[0]) == (Run.Status.PENDING, None)


def _stopped(leadership: Leadership) -> Leadership:
    leadership.stop_event.set()
    return leadership


def _disbelieved(leadership: Leadership) -> Leadership:
    return Leadership(
        term=leadership.term,
        stop_event=leadership.stop_event,
        using="default",
        ttl=10,
        believed=lambda: False,
    )


@pytest.mark.parametrize("end", [_stopped, _disbelieved], ids=["stopping", "belief-window-closed"])
def test_publish_due_publishes_nothing_once_leadership_is_not_running(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    handed: list[list[Run]],
    end: Callable[[Leadership], Leadership],
) -> None:
    runs = _runs(term, 10, 20)
    box.add(runs, term, {})
    ended = end(leadership)
    assert not ended.running
    assert box.publish_due(_at(20), ended) is True
    assert _drain(app) == []
    assert [_status(r) for r in runs] == [(Run.Status.PENDING, None)] * 2
    assert handed == []
    assert box.task_ids == set(_ids(runs)), "kept: the next leader publishes from the ledger"


def test_publish_due_stops_between_batches_when_leadership_ends(
    app: Celery,
    box: Outbox,
    term: Term,
    leadership: Leadership,
    handed: list[list[Run]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox, "BATCH", 1)
    mark = ledger.mark_published

    def deposed_after(task_ids: list[str], **kwargs: Any) -> None:
        mark(task_ids, **kwargs)
        leadership.stop_event.set()  # the first batch is out, then the term ends

    monkeypatch.setattr(ledger, "mark_published", deposed_after)
    first, second = _runs(term, 10, 20)
    box.add([first, second], term, {})
    assert box.publish_due(_at(20), leadership) is True
    assert [h["id"] for h in _drain(app)] == [first.task_id]
    assert _status(first)[0] == Run.Status.PUBLISHED
    assert _status(second) == (Run.Status.PENDING, None)
    assert [_ids(call) for call in handed] == [[first.task_id]]
