"""Looking for changed schedules: ``look`` against the real test database, and the
``Watcher`` thread that runs it off the dispatch thread and hands results over."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from celery import Celery
from django.db import connections
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons.beat import refresh
from cluster_singletons.models import ScheduleRecord
from tests.tcpproxy import end_session

T = TypeVar("T")

#: Generous: the thread looks every 10 ms, so anything expected shows up within a few.
DEADLINE = 5.0


def _within(what: str, probe: Callable[[], T | None]) -> T:
    """The first truthy ``probe()``, polled until ``DEADLINE``."""
    deadline = time.monotonic() + DEADLINE
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE}s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def app() -> Celery:
    app = Celery("refresh-test", broker="memory://", set_as_current=False)

    @app.task(name="t.tick", shared=False)
    def tick(*args: Any, **kwargs: Any) -> None:
        """A task the schedules name; never run."""

    app.conf.beat_schedule = {"ten": {"task": "t.tick", "schedule": 10}}
    return app


def _periodic(name: str) -> PeriodicTask:
    every, _ = IntervalSchedule.objects.get_or_create(every=10, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name=name, task="t.tick", interval=every)


def _look(app: Celery, seen: refresh.Seen | None = None, *, full: bool = False) -> refresh.Seen:
    return refresh.look(
        app,
        using="default",
        signature=seen.signature if seen else None,
        previous=(seen.found or {}) if seen else {},
        full=full,
    )


# -- look --------------------------------------------------------------------------------


@pytest.mark.db
@pytest.mark.django_db
def test_look_rereads_nothing_while_the_signature_is_unchanged(app: Celery) -> None:
    _periodic("a")
    first = _look(app, full=True)
    assert first.found is not None and {"periodic:a", "beat:ten"} <= set(first.found)
    again = _look(app, first)
    assert again.found is None
    assert again.signature == first.signature


@pytest.mark.db
@pytest.mark.django_db
def test_look_rereads_every_schedule_once_the_signature_changed(app: Celery) -> None:
    _periodic("a")
    first = _look(app, full=True)
    assert first.found is not None
    _periodic("b")
    changed = _look(app, first)
    assert changed.signature != first.signature
    assert changed.found is not None
    assert {"periodic:a", "periodic:b", "beat:ten"} <= set(changed.found)
    assert changed.found["periodic:a"] is first.found["periodic:a"], "unchanged row reused"


@pytest.mark.db
@pytest.mark.django_db
def test_a_full_look_rereads_every_schedule_even_when_nothing_changed(app: Celery) -> None:
    _periodic("a")
    first = _look(app, full=True)
    full = _look(app, first, full=True)
    assert full.signature == first.signature
    assert full.found is not None
    assert set(full.found) == set(first.found or {})


@pytest.mark.db
@pytest.mark.django_db
def test_paused_keys_are_the_schedule_records_marked_paused(app: Celery) -> None:
    _periodic("a")
    ScheduleRecord.objects.create(key="periodic:a", paused=True)
    ScheduleRecord.objects.create(key="beat:ten", paused=False)
    ScheduleRecord.objects.create(key="cron:gone", paused=True)  # no such schedule any more
    first = _look(app, full=True)
    assert first.paused == frozenset({"periodic:a", "cron:gone"})
    ScheduleRecord.objects.filter(key="cron:gone").update(paused=False)
    again = _look(app, first)
    assert again.found is None, "pausing is not a change of the schedules"
    assert again.paused == frozenset({"periodic:a"}), "paused keys are read on every look"


# -- Watcher -----------------------------------------------------------------------------


def _seen(n: int) -> refresh.Seen:
    return refresh.Seen(paused=frozenset(), signature=n, found=None)


class Looks:
    """A look callable: returns ``Seen(signature=n)`` for call ``n`` (1, 2, ...) until
    ``hold_from``, where it blocks until ``release`` is set."""

    def __init__(self, *, hold_from: int | None = None) -> None:
        self.calls = 0
        self.hold_from = hold_from
        self.release = threading.Event()

    def __call__(self, *, full: bool = False) -> refresh.Seen:
        self.calls += 1
        if self.hold_from is not None and self.calls >= self.hold_from:
            self.release.wait(DEADLINE)
        return _seen(self.calls)


@pytest.fixture
def watched() -> Iterator[Callable[..., refresh.Watcher]]:
    """Start watchers; every one is released and stopped at the end of the test."""
    started: list[tuple[refresh.Watcher, Looks | None]] = []

    def start(look: Callable[..., refresh.Seen], interval: float = 0.01) -> refresh.Watcher:
        watcher = refresh.Watcher(look, interval=interval, using="default")
        started.append((watcher, look if isinstance(look, Looks) else None))
        watcher.start()
        return watcher

    yield start
    for watcher, looks in started:
        if looks is not None:
            looks.release.set()
        watcher.stop()


@pytest.fixture
def beat_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the ``cluster_singletons.beat`` logger (its parent does not propagate)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("cluster_singletons.beat")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_take_hands_over_the_newest_look_once(
    watched: Callable[..., refresh.Watcher],
) -> None:
    looks = Looks(hold_from=4)  # three looks come back, the fourth waits
    watcher = watched(looks)
    _within("the fourth look to start", lambda: looks.calls >= 4)
    taken = watcher.take()
    assert taken is not None
    assert taken.signature == 3, "the newest of the three, not the first"
    assert watcher.take() is None, "handed over once"
    looks.release.set()
    later = _within("the look after the release", watcher.take)
    assert isinstance(later.signature, int) and later.signature >= 4


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_take_is_none_before_the_first_look(watched: Callable[..., refresh.Watcher]) -> None:
    looks = Looks()
    watcher = watched(looks, interval=60)
    assert watcher.take() is None
    assert looks.calls == 0, "the first look waits one interval"


def _failing(
    app: Celery, fail: Callable[[int], None], calls: list[int]
) -> Callable[..., refresh.Seen]:
    """A full look that first calls ``fail(n)`` on its n-th call (counted in ``calls``)."""

    def look(*, full: bool = False) -> refresh.Seen:
        calls.append(1)
        fail(len(calls))
        return _look(app, full=True)

    return look


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_database_error_is_logged_once_and_the_watcher_keeps_looking(
    app: Celery,
    watched: Callable[..., refresh.Watcher],
    beat_log: list[logging.LogRecord],
) -> None:
    _periodic("a")
    failures = 3

    def fail(call: int) -> None:
        if call <= failures:
            # A real error from the watcher's own connection (OperationalError on SQLite,
            # ProgrammingError on PostgreSQL: both DatabaseErrors).
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT * FROM no_such_table_for_refresh_tests")

    calls: list[int] = []
    watcher = watched(_failing(app, fail, calls))
    seen = _within("a look after the failures", watcher.take)
    assert len(calls) > failures
    assert seen.found is not None and "periodic:a" in seen.found
    warnings = [r for r in beat_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1, f"logged once for {failures} failures: {warnings}"
    assert warnings[0].getMessage().startswith("looking for changed schedules failed: ")
    assert "no_such_table_for_refresh_tests" in warnings[0].getMessage()
    assert [r.getMessage() for r in beat_log if r.levelno == logging.INFO] == [
        "looking for changed schedules works again"
    ]


@pytest.mark.db
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_watcher_whose_session_the_server_ended_connects_again(
    app: Celery,
    watched: Callable[..., refresh.Watcher],
    beat_log: list[logging.LogRecord],
) -> None:
    _periodic("a")

    def fail(call: int) -> None:
        if call == 1:
            end_session()  # the database restarts under the watcher's thread

    calls: list[int] = []
    watcher = watched(_failing(app, fail, calls))
    seen = _within("a look after the restart", watcher.take)
    assert seen.found is not None and "periodic:a" in seen.found
    assert len(calls) == 2, "the look right after the failed one worked"
    warnings = [r.getMessage() for r in beat_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection is closed" in warnings[0]


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_stop_ends_the_thread_without_waiting_out_the_interval(
    watched: Callable[..., refresh.Watcher],
) -> None:
    looks = Looks()
    watcher = watched(looks, interval=60)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < DEADLINE / 2
    assert not watcher._thread.is_alive()
    assert looks.calls == 0


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
def test_a_stopped_watcher_looks_no_more(watched: Callable[..., refresh.Watcher]) -> None:
    looks = Looks()
    watcher = watched(looks)
    _within("a few looks", lambda: looks.calls >= 3)
    watcher.stop()
    assert not watcher._thread.is_alive()
    calls = looks.calls
    watcher.take()
    assert watcher.take() is None
    assert looks.calls == calls, "no look after stop() returned"
