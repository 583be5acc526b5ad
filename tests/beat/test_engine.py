"""The beat engine driven with an injected clock against the real database and a real
(in-memory kombu) broker: what the broker received is what is counted."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from django.db.models.functions import Now
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
)

from cluster_singletons import context
from cluster_singletons.beat import crons, deliveries, ledger, refresh
from cluster_singletons.beat.engine import BeatEngine
from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster import leases, membership
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import DeliveryNotCancellable, LeadershipLost
from cluster_singletons.models import Delivery, Heartbeat, Lease, Run, ScheduleRecord
from cluster_singletons.snowflake import default_generator
from project.demo.localcluster import poll, received
from tests.tcpproxy import end_session

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

T0 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    # Celery prefers CELERY_BROKER_URL from the environment to an app's own broker.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("beat-test", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "beat-test"

    @app.task(name="t.tick", shared=False)
    def tick(*args: Any, **kwargs: Any) -> None:
        """A task the schedules name; never run here, only received."""

    yield app
    _drain(app)


@pytest.fixture(autouse=True)
def _give_back_machine_id() -> Iterator[None]:
    """Deliveries take Snowflake ids: free the machine id before the test database goes."""
    yield
    default_generator().close()


def _drain(app: Celery) -> list[dict[str, Any]]:
    return received(app, "beat-test")


class Leader:
    """A real term of the ``beat`` lease and an engine driven by a frozen clock."""

    def __init__(
        self, app: Celery, *, wall: datetime = T0, settings: Any = None, loaded: Any = None
    ) -> None:
        leases.ensure(["beat"], using="default")
        self.runner_id = membership.register(host="t", pid=1, kind="beat", using="default")
        term = leases.acquire("beat", self.runner_id, ttl=30, using="default")
        if term is None:  # a previous leader of this test: take over as a failover would
            Lease.objects.filter(name="beat").update(expires_at=Now())
            term = leases.acquire("beat", self.runner_id, ttl=30, using="default")
        assert term is not None
        self.stop = threading.Event()
        self.leadership = Leadership(term=term, stop_event=self.stop, using="default", ttl=30)
        self.clock = FrozenClock(wall=wall)
        # No worker reports runs finished here: dispatch regardless unless a test says so.
        settings = settings or get_settings().model_copy(update={"overlap": "allow_all"})
        self.engine = BeatEngine(app, clock=self.clock, settings=settings, loaded=loaded)
        self.warm = self.engine.start(self.leadership)

    def at(self, seconds: float) -> datetime:
        """Advance to ``T0 + seconds`` and run a pass."""
        self.clock.advance((T0 + timedelta(seconds=seconds) - self.clock.now()).total_seconds())
        return self.engine.step(self.leadership)


def _ticks(app: Celery) -> list[str]:
    return sorted(h["cluster_context"]["tick"] for h in _drain(app))


def _every(app: Celery, name: str, seconds: float, **options: Any) -> None:
    entry = {"task": "t.tick", "schedule": seconds, "args": [name]}
    if options:
        entry["options"] = options
    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), name: entry}


def test_each_tick_is_published_once_with_its_deterministic_id(app: Celery) -> None:
    _every(app, "ten", 10)
    leader = Leader(app)
    assert _drain(app) == []
    for second in range(1, 61):
        leader.at(second)
    headers = _drain(app)
    ticks = sorted(h["cluster_context"]["tick"] for h in headers)
    assert ticks == [(T0 + timedelta(seconds=s)).isoformat() for s in range(10, 61, 10)]
    for h in headers:
        tick = datetime.fromisoformat(h["cluster_context"]["tick"])
        assert h["id"] == ledger.task_id("beat:ten", tick)
        assert h["cluster_context"]["schedule"] == "beat:ten"
    assert Run.objects.filter(status=Run.Status.PUBLISHED).count() == 6


def test_a_new_leader_continues_the_chain_and_republishes_pending_intents(app: Celery) -> None:
    _every(app, "ten", 10)
    first = Leader(app)
    first.at(10)
    assert _ticks(app) == [(T0 + timedelta(seconds=10)).isoformat()]
    # The first leader recorded the tick for 20 s but died before publishing it.
    first.stop.set()
    first.at(20)
    pending = Run.objects.get(status=Run.Status.PENDING)
    assert pending.tick == T0 + timedelta(seconds=20)
    assert _drain(app) == []

    second = Leader(app, wall=T0 + timedelta(seconds=21))
    headers = _drain(app)
    assert [h["id"] for h in headers] == [pending.task_id], "re-published under the same id"
    second.at(30)
    assert _ticks(app) == [(T0 + timedelta(seconds=30)).isoformat()]
    assert Run.objects.filter(schedule="beat:ten").count() == 3


def test_a_deposed_leader_records_and_publishes_nothing(app: Celery) -> None:
    _every(app, "ten", 10)
    leader = Leader(app)
    Lease.objects.filter(name="beat").update(epoch=leader.leadership.term.epoch + 1)
    with pytest.raises(LeadershipLost):
        leader.at(10)
    assert Run.objects.count() == 0
    assert _drain(app) == []


def test_missed_ticks_older_than_the_horizon_are_skipped_newer_ones_run_once(
    app: Celery,
) -> None:
    _every(app, "minute", 60, skip_if_older_than=600)
    ScheduleRecord.objects.create(key="beat:minute", last_tick=T0 - timedelta(hours=2))
    Leader(app).at(0)  # down for two hours: the first pass catches up
    skipped = Run.objects.get(status=Run.Status.SKIPPED)
    assert skipped.first_tick == T0 - timedelta(hours=2) + timedelta(minutes=1)
    assert skipped.tick == T0 - timedelta(minutes=11)
    assert skipped.ticks == 109
    ran = Run.objects.get(status=Run.Status.PUBLISHED)
    assert (ran.first_tick, ran.tick, ran.ticks) == (T0 - timedelta(minutes=10), T0, 11)
    assert len(_drain(app)) == 1, "coalesced: one run for the ten recent ticks"


def test_overlap_policies(app: Celery) -> None:
    _every(app, "skip", 10, overlap="skip")
    _every(app, "buffer", 10, overlap="buffer_one")
    _every(app, "all", 10, overlap="allow_all")
    leader = Leader(app)
    leader.at(10)
    leader.at(20)  # no run has finished: no worker reported
    leader.at(30)
    sent = _drain(app)
    by = {
        k: [h for h in sent if h["cluster_context"]["schedule"] == k]
        for k in ("beat:skip", "beat:buffer", "beat:all")
    }
    assert (len(by["beat:skip"]), len(by["beat:buffer"]), len(by["beat:all"])) == (1, 1, 3)
    assert Run.objects.filter(schedule="beat:skip", status=Run.Status.SKIPPED).count() == 2
    # The worker reports the first runs finished: buffer_one dispatches what it held.
    for h in by["beat:buffer"] + by["beat:skip"]:
        ledger.report(h["id"], Run.Status.SUCCEEDED, using="default")
    leader.at(31)
    held = _drain(app)
    assert [h["cluster_context"]["schedule"] for h in held] == ["beat:buffer"]
    run = Run.objects.get(task_id=held[0]["id"])
    assert (run.first_tick, run.tick, run.ticks) == (
        T0 + timedelta(seconds=20),
        T0 + timedelta(seconds=30),
        2,
    )
    leader.at(40)
    assert sorted(h["cluster_context"]["schedule"] for h in _drain(app)) == [
        "beat:all",
        "beat:skip",
    ]


def _periodic(name: str, **fields: Any) -> PeriodicTask:
    fields.setdefault("task", "t.tick")
    return PeriodicTask.objects.create(name=name, **fields)


def test_periodic_tasks_run_and_their_bookkeeping_stays_true(app: Celery) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    cron = CrontabSchedule.objects.create(minute="*", timezone="Europe/Berlin")
    _periodic("ival", interval=every, start_time=T0, queue="beat-test", kwargs='{"a": 1}')
    _periodic("cron", crontab=cron, queue="beat-test")
    _periodic("once", interval=every, one_off=True, start_time=T0, queue="beat-test")
    clocked = ClockedSchedule.objects.create(clocked_time=T0 + timedelta(seconds=25))
    _periodic("clocked", clocked=clocked, one_off=True, queue="beat-test")
    _periodic("expired", interval=every, expires=T0 + timedelta(seconds=15), start_time=T0)
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    for second in (10, 20, 30, 40, 50, 60):
        leader.at(second)
    schedules = [h["cluster_context"]["schedule"] for h in _drain(app)]
    assert schedules.count("periodic:ival") == 6
    assert schedules.count("periodic:cron") == 1
    assert schedules.count("periodic:once") == 1
    assert schedules.count("periodic:clocked") == 1
    assert schedules.count("periodic:expired") == 1
    ival = PeriodicTask.objects.get(name="ival")
    assert ival.total_run_count == 6
    assert ival.last_run_at is not None
    assert not PeriodicTask.objects.get(name="once").enabled
    run = Run.objects.filter(schedule="periodic:ival").first()
    assert run is not None and json.loads(run.message)["kwargs"] == {"a": 1}


def test_invalid_schedules_are_flagged_and_the_rest_keep_running(app: Celery) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    bad_cron = CrontabSchedule.objects.create(minute="61")
    _periodic("good", interval=every, queue="beat-test")
    _periodic("bad-cron", crontab=bad_cron)
    _periodic("bad-task", interval=every, task="no.such.task")
    _periodic("bad-args", interval=every, args="[not json")
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(10)
    leader.at(20)
    assert [h["cluster_context"]["schedule"] for h in _drain(app)] == ["periodic:good"] * 2
    errors = dict(Run.objects.filter(status=Run.Status.ERROR).values_list("schedule", "reason"))
    assert set(errors) == {"periodic:bad-cron", "periodic:bad-task", "periodic:bad-args"}
    assert "invalid cron expression" in errors["periodic:bad-cron"]
    assert "unknown task 'no.such.task'" in errors["periodic:bad-task"]
    assert ScheduleRecord.objects.get(key="periodic:bad-args").problem.startswith("args")


def test_edits_are_picked_up_live_even_bulk_updates(app: Celery, settings: Any) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    task = _periodic("edited", interval=every, start_time=T0, queue="beat-test")
    PeriodicTask.objects.update(date_changed=T0)
    leader = Leader(app)
    leader.at(10)
    assert len(_drain(app)) == 1
    # An edit through save() (signals): seen at the next refresh.
    task.enabled = False
    task.save()
    leader.at(16)
    leader.at(30)
    assert _drain(app) == []
    # A bulk update() sends no signal and leaves date_changed alone: seen at the full reread.
    PeriodicTask.objects.filter(name="edited").update(enabled=True)
    leader.at(100)
    leader.at(110)
    assert len(_drain(app)) >= 1


def test_paused_schedules_run_nothing_and_do_not_catch_up_when_resumed(app: Celery) -> None:
    _every(app, "ten", 10)
    leader = Leader(app)
    ScheduleRecord.objects.update_or_create(
        key="beat:ten", defaults={"paused": True, "pause_note": "maintenance"}
    )
    leader.at(10)  # refresh sees the pause
    for second in (20, 30, 40):
        leader.at(second)
    assert _drain(app) == []
    ScheduleRecord.objects.filter(key="beat:ten").update(paused=False)
    leader.at(50)
    assert _ticks(app) == [(T0 + timedelta(seconds=50)).isoformat()]


def test_delayed_delivery_is_dispatched_once_when_due_and_can_be_cancelled(app: Celery) -> None:
    leader = Leader(app)
    sig = app.signature("t.tick", args=("later",), queue="beat-test")
    kept = deliveries.deliver_at(sig, T0 + timedelta(seconds=5))
    dropped = deliveries.deliver_at(sig, T0 + timedelta(seconds=5))
    deliveries.cancel(dropped)
    with pytest.raises(DeliveryNotCancellable):
        deliveries.cancel(dropped)
    leader.at(4.9)
    assert _drain(app) == []
    leader.at(5)
    got = _drain(app)
    assert [h["cluster_context"]["schedule"] for h in got] == [f"delivery:{kept}"]
    assert Delivery.objects.get(id=kept).status == Delivery.Status.DISPATCHED
    assert Delivery.objects.get(id=dropped).status == Delivery.Status.CANCELLED
    with pytest.raises(DeliveryNotCancellable):
        deliveries.cancel(kept)
    leader.at(10)
    assert _drain(app) == []


def test_context_of_a_dispatch_names_schedule_tick_and_epoch(app: Celery) -> None:
    _every(app, "ten", 10)
    leader = Leader(app)
    leader.at(10)
    (headers,) = _drain(app)
    ctx = context.ClusterContext.from_header(headers["cluster_context"])
    assert ctx is not None
    assert (ctx.schedule, ctx.epoch, ctx.task_id) == (
        "beat:ten",
        leader.leadership.term.epoch,
        headers["id"],
    )


def _run_cron(app: Celery, name: str, job: Callable[[Run], None], ends: str) -> None:
    """Declare ``job`` a ``@cron`` every minute, lead through its first tick, and wait
    until its run ends as ``ends``."""
    crons.cron(name, "* * * * *", tz="Europe/Berlin")(job)
    try:
        leader = Leader(app)
        leader.at(59)
        leader.at(60)
        poll(
            f"the cron run to end {ends}",
            lambda: Run.objects.filter(schedule=f"cron:{name}", status=ends).exists(),
            timeout=10,
        )
    finally:
        crons._crons.pop(f"cron:{name}")


def test_cron_functions_run_in_the_leader_and_report_their_end(app: Celery) -> None:
    calls: list[tuple[datetime, str | None]] = []

    def job(run: Run) -> None:
        calls.append((run.tick, context.current().schedule))

    _run_cron(app, "t-cron", job, Run.Status.SUCCEEDED)
    assert calls == [(T0 + timedelta(minutes=1), "cron:t-cron")]
    assert _drain(app) == [], "in-runner: nothing goes through the broker"


@pytest.mark.postgres
def test_a_cron_call_that_met_a_restart_reports_its_end_on_a_fresh_connection(
    app: Celery,
) -> None:
    def job(run: Run) -> None:
        end_session()  # the database restarts during the call
        Lease.objects.count()  # and the function fails on the closed connection

    _run_cron(app, "t-restart", job, Run.Status.FAILED)
    beat = Heartbeat.objects.get(name="cron:t-restart")
    assert beat.failures == 1 and "connection is closed" in beat.last_error


@pytest.mark.parametrize(
    ("night", "expected"),
    [
        (datetime(2026, 3, 29, 0, 0, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
        (datetime(2026, 10, 25, 0, 0, tzinfo=UTC) - timedelta(hours=1), None),
    ],
)
def test_the_engine_runs_a_dst_night_job_once(
    app: Celery, night: datetime, expected: datetime | None
) -> None:
    """02:30 Europe/Berlin: at 03:00 CEST when skipped, at the first 02:30 when repeated."""
    app.conf.timezone = "Europe/Berlin"
    app.conf.beat_schedule = {"night": {"task": "t.tick", "schedule": crontab(minute=30, hour=2)}}
    leader = Leader(app, wall=night)
    for _ in range(0, 4 * 60, 5):
        leader.clock.advance(300)
        leader.engine.step(leader.leadership)
    ticks = [datetime.fromisoformat(h["cluster_context"]["tick"]) for h in _drain(app)]
    first_half_past_two = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    assert ticks == [expected or first_half_past_two]


def test_calculate_next_run_from_previous_counts_from_the_actual_run(app: Celery) -> None:
    _every(app, "grid", 10)
    _every(app, "drift", 10, calculate_next_run_from_previous=True)
    ScheduleRecord.objects.create(key="beat:grid", last_tick=T0)
    ScheduleRecord.objects.create(key="beat:drift", last_tick=T0)
    leader = Leader(app)
    leader.at(13)  # both are 3 s late
    leader.at(20)
    leader.at(23)
    sent = [(h["cluster_context"]["schedule"], h["cluster_context"]["tick"]) for h in _drain(app)]
    at = {s: (T0 + timedelta(seconds=s)).isoformat() for s in (10, 13, 20, 23)}
    assert sorted(sent) == [
        ("beat:drift", at[13]),
        ("beat:drift", at[23]),
        ("beat:grid", at[10]),
        ("beat:grid", at[20]),
    ]


def test_ticks_are_recorded_ahead_and_published_when_due(app: Celery) -> None:
    _every(app, "ten", 10)
    first = Leader(app)
    first.at(9.5)  # within beat_lookahead of the tick: recorded, message built, not sent
    ahead = Run.objects.get(schedule="beat:ten")
    assert (ahead.tick, ahead.status) == (T0 + timedelta(seconds=10), Run.Status.PENDING)
    assert _drain(app) == []
    # The leader dies holding it; its successor leaves it alone until it is due.
    second = Leader(app, wall=T0 + timedelta(seconds=9.6))
    assert _drain(app) == []
    second.at(10)
    headers = _drain(app)
    assert [h["id"] for h in headers] == [ahead.task_id]
    ahead.refresh_from_db()
    assert (ahead.status, ahead.published_at) == (Run.Status.PUBLISHED, T0 + timedelta(seconds=10))
    second.at(11)
    assert _drain(app) == [] and Run.objects.count() == 1


def test_the_overlap_policy_is_applied_when_the_tick_is_due(app: Celery) -> None:
    _every(app, "skip", 10, overlap="skip")
    leader = Leader(app)
    leader.at(10)
    (first,) = _drain(app)
    leader.at(19.5)  # the run of 10 s is still open: nothing decided ahead
    assert Run.objects.count() == 1
    ledger.report(first["id"], Run.Status.SUCCEEDED, using="default")
    leader.at(20)
    assert _ticks(app) == [(T0 + timedelta(seconds=20)).isoformat()]
    assert not Run.objects.filter(status=Run.Status.SKIPPED).exists()
    leader.at(29.5)  # open again, and still open when due: skipped then
    assert Run.objects.count() == 2
    leader.at(30)
    assert Run.objects.get(status=Run.Status.SKIPPED).tick == T0 + timedelta(seconds=30)


def test_the_refresh_thread_hands_over_edited_schedules(app: Celery) -> None:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    task = _periodic("edited", interval=every, start_time=T0, queue="beat-test")
    seen = refresh.look(app, using="default", signature=None, previous={}, full=True)
    assert seen.found is not None and not seen.found["periodic:edited"].problem

    def look(*, full: bool = False) -> refresh.Seen:
        return refresh.look(
            app, using="default", signature=seen.signature, previous=seen.found or {}, full=False
        )

    watcher = refresh.Watcher(look, interval=0.05, using="default")
    watcher.start()
    try:
        first = poll("a first look", watcher.take, timeout=10)
        assert first.found is None, "nothing changed: nothing reread"
        task.task = "no.such.task"
        task.save()
        ScheduleRecord.objects.create(key="periodic:edited", paused=True)
        later = poll(
            "the edit", lambda: (s := watcher.take()) and s.found is not None and s, timeout=10
        )
    finally:
        watcher.stop()
    assert later.paused == {"periodic:edited"}
    assert later.found["periodic:edited"].problem == "unknown task 'no.such.task'"


def test_a_run_whose_message_cannot_be_built_is_an_error_row_and_the_rest_run(
    app: Celery,
) -> None:
    _every(app, "good", 10)
    _every(app, "bad", 10, expires="not a date")  # Celery cannot parse it when sending
    leader = Leader(app)
    leader.at(10)
    leader.at(20)
    assert _ticks(app) == [(T0 + timedelta(seconds=s)).isoformat() for s in (10, 20)]
    bad = Run.objects.filter(schedule="beat:bad").order_by("tick")
    assert [r.status for r in bad] == [Run.Status.ERROR, Run.Status.ERROR]
    assert "message cannot be built" in bad[0].reason
    assert not Run.objects.filter(status=Run.Status.PENDING, tick__lte=leader.clock.now()).exists()
