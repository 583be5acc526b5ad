"""Switching from django-celery-beat's ``DatabaseScheduler``: after the switch the broker
receives the runs it received before, one per tick, carrying what DatabaseScheduler's
messages carry; a DatabaseScheduler still running beside the leader is reported.

The engine tests drive a real leader term with a frozen clock; the process tests run real
``celery beat`` processes on the configured broker. What is counted is what the broker
holds, read back message by message. No worker runs, so no run ever reports finished
(Celery's beat dispatches regardless, and so must the default).

DatabaseScheduler's own code writes its rows here (``ModelEntry``), as it does when it runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import ModelEntry

from cluster_singletons.beat import sources
from cluster_singletons.beat.timetables import Cron, Every
from cluster_singletons.conf import ClusterSettings
from cluster_singletons.models import Run
from project.celery import app as project_app
from project.demo.localcluster import Cluster, poll, received
from tests.beat.test_engine import T0, Leader, _drain

pytestmark = pytest.mark.django_db(transaction=True)

DATABASE_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
#: Fast leases; every other setting (the overlap policy among them) is the default.
FAST = {"lease_ttl": 2.0, "renew_interval": 0.5, "acquire_interval": 0.1}
EVERY = 2


CLEANUP = "celery.backend_cleanup"


def _ran_database_scheduler(app: Celery, entries: dict[str, dict[str, Any]]) -> None:
    """What DatabaseScheduler leaves behind: each entry mirrored into a row by its own
    code, and its last run (``sync``) at ``T0``."""
    for name, entry in entries.items():
        ModelEntry.from_entry(name, app=app, **entry)
    PeriodicTask.objects.filter(name__in=list(entries)).update(last_run_at=T0)


def _every_ten(**options: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"task": "t.tick", "schedule": 10, "args": ["ten"]}
    if options:
        entry["options"] = options
    return entry


@pytest.mark.db
def test_an_entry_database_scheduler_mirrored_runs_once_per_tick_as_its_row(app: Celery) -> None:
    app.conf.beat_schedule = {"ten": _every_ten()}
    _ran_database_scheduler(app, app.conf.beat_schedule)
    leader = Leader(app)
    for second in range(1, 61):
        leader.at(second)
    sent = _drain(app)
    assert {h["cluster_context"]["schedule"] for h in sent} == {"periodic:ten"}
    ticks = sorted(h["cluster_context"]["tick"] for h in sent)
    assert ticks == [(T0 + timedelta(seconds=s)).isoformat() for s in range(10, 61, 10)]
    assert {h["periodic_task_name"] for h in sent} == {"ten"}, "as DatabaseScheduler sends"
    assert PeriodicTask.objects.get(name="ten").total_run_count == 6


@pytest.mark.db
def test_mirroring_an_entry_its_row_already_holds_saves_nothing(app: Celery) -> None:
    """Each term starts by mirroring; an unchanged row is not saved again, so a warm
    standby's takeover finds no edit to reread every schedule for."""
    from cluster_singletons.beat import sources

    app.conf.beat_schedule = {"ten": _every_ten()}
    _ran_database_scheduler(app, app.conf.beat_schedule)
    saved = PeriodicTask.objects.get(name="ten").date_changed
    assert sources.mirror(app, using="default") == []
    assert PeriodicTask.objects.get(name="ten").date_changed == saved
    app.conf.beat_schedule = {"ten": _every_ten(queue="other")}
    assert sources.mirror(app, using="default") == ["ten"], "a changed entry is written"
    assert PeriodicTask.objects.get(name="ten").queue == "other"
    assert sources.mirror(app, using="default") == []


@pytest.mark.db
def test_by_default_a_tick_runs_while_the_previous_run_has_not_finished(app: Celery) -> None:
    """Celery's beat dispatches every tick whatever became of the previous run; so does
    the default policy (``skip`` and ``buffer_one`` are opted into)."""
    assert ClusterSettings().overlap == "allow_all"
    app.conf.beat_schedule = {"ten": _every_ten()}
    leader = Leader(app, settings=ClusterSettings())
    for second in (10, 20, 30):
        leader.at(second)
    assert len(_drain(app)) == 3, "no worker reported a run finished"
    assert not Run.objects.filter(status=Run.Status.SKIPPED).exists()


@pytest.mark.db
@pytest.mark.parametrize("horizon", [None, 315_360_000], ids=["default", "ten-years"])
def test_after_a_downtime_a_long_horizon_runs_the_missed_ticks_once_as_celery_does(
    app: Celery, horizon: int | None
) -> None:
    """DatabaseScheduler runs a tick missed two hours ago once; so does this beat with
    ``skip_if_older_than`` set to ten years (the default skips what is over an hour old)."""
    app.conf.beat_schedule = {"ten": _every_ten()}
    _ran_database_scheduler(app, app.conf.beat_schedule)
    PeriodicTask.objects.update(last_run_at=T0 - timedelta(hours=2))
    settings = ClusterSettings(**({"skip_if_older_than": horizon} if horizon else {}))
    Leader(app, settings=settings).at(0)
    (run,) = Run.objects.filter(status=Run.Status.PUBLISHED)
    skipped = Run.objects.filter(status=Run.Status.SKIPPED)
    assert len(_drain(app)) == 1
    if horizon:
        assert not skipped.exists() and run.ticks == 720
    else:
        assert (skipped.get().ticks, run.ticks) == (359, 361)


@pytest.mark.db
def test_a_run_no_worker_reports_blocks_skip_for_overlap_timeout_only(app: Celery) -> None:
    """``skip`` in place of a task lock: a run whose worker died (it never reports) stops
    blocking its schedule after ``overlap_timeout``."""
    app.conf.beat_schedule = {"ten": _every_ten(overlap="skip")}
    leader = Leader(app, settings=ClusterSettings(overlap_timeout=30))
    for second in range(10, 61, 10):
        leader.at(second)
    ticks = sorted(h["cluster_context"]["tick"] for h in _drain(app))
    assert ticks == [(T0 + timedelta(seconds=s)).isoformat() for s in (10, 50)]
    skipped = Run.objects.filter(status=Run.Status.SKIPPED).order_by("tick")
    assert [r.tick for r in skipped] == [T0 + timedelta(seconds=s) for s in (20, 30, 40, 60)]


@pytest.mark.db
def test_the_row_is_the_schedule_and_keeps_the_entrys_beat_options(app: Celery) -> None:
    app.conf.beat_schedule = {
        "ten": _every_ten(overlap="skip", skip_if_older_than=5),
        "broken": _every_ten(overlap="sometimes"),
        "code-only": _every_ten(),
    }
    _ran_database_scheduler(app, {"ten": _every_ten(), "broken": _every_ten()})
    # An operator edits the mirrored row in the admin.
    row = PeriodicTask.objects.get(name="ten")
    row.interval = IntervalSchedule.objects.create(every=30, period=IntervalSchedule.SECONDS)
    row.save()
    found = sources.load_all(app, using="default")
    assert "beat:ten" not in found
    ten = found["periodic:ten"]
    assert (ten.timetable, ten.overlap, ten.skip_if_older_than) == (Every(30), "skip", 5.0)
    assert found["beat:broken"].problem.startswith("overlap must be one of"), "still flagged"
    assert found["periodic:broken"].problem == ""
    assert found["beat:code-only"].timetable == Every(10), "no row: the entry itself"


@pytest.mark.db
def test_a_new_leader_writes_the_entries_into_their_rows_as_database_scheduler_starts(
    app: Celery,
) -> None:
    _ran_database_scheduler(app, {"ten": _every_ten(), "gone": _every_ten()})
    PeriodicTask.objects.filter(name="ten").update(enabled=False)  # an operator paused it
    app.conf.beat_schedule = {"ten": {**_every_ten(), "schedule": 20}, "new": _every_ten()}
    Leader(app)
    rows = {r.name: r for r in PeriodicTask.objects.select_related("interval")}
    assert set(rows) == {"ten", "gone"}, "no row is created for an entry that has none"
    assert (rows["ten"].interval.every, rows["ten"].enabled) == (20, False)
    assert rows["gone"].interval.every == 10, "a row no entry names is left as it is"
    found = sources.load_all(app, using="default")
    assert found["periodic:ten"].timetable == Every(20)
    assert "beat:new" in found


@pytest.fixture
def results(app: Celery, tmp_path: Path) -> Iterator[Celery]:
    """A result backend that does not expire results itself (files)."""
    app.conf.result_backend = f"file://{tmp_path}"
    yield app
    app.conf.result_backend = None


@pytest.mark.db
def test_the_default_backend_cleanup_entry_is_celerys_with_a_result_backend(
    results: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    found = sources.load_all(results, using="default")
    cleanup = found[f"beat:{CLEANUP}"]
    assert cleanup.task == CLEANUP
    assert cleanup.options == {"expires": 12 * 3600, "headers": {"celery_beat_task": True}}
    assert isinstance(cleanup.timetable, Cron) and cleanup.timetable.expression == "0 4 * * *"
    results.conf.result_expires = None
    assert f"beat:{CLEANUP}" not in sources.load_all(results, using="default")
    results.conf.result_expires = 86400
    # Without a backend (Celery's beat sends a no-op then), one that expires its results
    # itself, or one that cannot be loaded (said once).
    for backend in (None, "redis://127.0.0.1:6379/9", "disabled://", "nosuch://x", "nosuch://x"):
        results.conf.result_backend = backend
        assert f"beat:{CLEANUP}" not in sources.load_all(results, using="default"), backend
    said = [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("result backend 'nosuch://x' cannot be loaded")


@pytest.mark.db
@pytest.mark.parametrize("mirrored", [False, True], ids=["celery-beat", "database-scheduler"])
def test_backend_cleanup_is_dispatched_once_a_day_at_four(results: Celery, mirrored: bool) -> None:
    if mirrored:  # DatabaseScheduler.install_default_entries ran: a row of the same name
        entry = {"task": CLEANUP, "schedule": crontab("0", "4", "*")}
        _ran_database_scheduler(results, {CLEANUP: {**entry, "options": {"expire_seconds": 43200}}})
    leader = Leader(results)
    leader.at(16 * 3600 - 1)
    assert _drain(results) == []
    leader.at(16 * 3600)  # 04:00 the next day
    leader.at(16 * 3600 + 60)
    (sent,) = _drain(results)
    assert sent["task"] == CLEANUP and sent["expires"] is not None
    assert sent["cluster_context"]["schedule"] == ("periodic:" if mirrored else "beat:") + CLEANUP
    assert sent.get("periodic_task_name") == (CLEANUP if mirrored else None)


@pytest.mark.db
def test_a_database_scheduler_writing_its_bookkeeping_beside_the_leader_is_reported(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.beat_schedule = {"ten": _every_ten()}
    _ran_database_scheduler(app, app.conf.beat_schedule)
    caplog.set_level(logging.WARNING, logger="cluster_singletons.beat")
    leader = Leader(app)
    for second in range(1, 41):
        leader.at(second)
    assert PeriodicTask.objects.get(name="ten").total_run_count == 4
    # An operator edits the row in the admin (a save with the last run it had), and
    # disables another with the admin's action (which clears its last run).
    row = PeriodicTask.objects.get(name="ten")
    row.description = "edited"
    row.save()
    _ran_database_scheduler(app, {"other": _every_ten()})
    PeriodicTask.objects.filter(name="other").update(enabled=False, last_run_at=None)
    for second in range(41, 51):
        leader.at(second)
    assert PeriodicTask.objects.get(name="ten").total_run_count == 5
    assert "bookkeeping moved" not in caplog.text, "our own bookkeeping is not someone else's"
    # A DatabaseScheduler dispatches the row too and saves its bookkeeping (its sync).
    dispatched = next(ModelEntry(PeriodicTask.objects.get(name="ten"), app=app))
    dispatched.save()
    leader.at(56)
    assert "bookkeeping moved without this beat (+1 run(s) counted" in caplog.text


def _cluster(tmp_path: Path, queue: str, settings: dict[str, Any] | None = None) -> Cluster:
    schedule = {"every-two": {"task": "demo.ping", "schedule": EVERY, "options": {"queue": queue}}}
    env = {"CELERY_BEAT_SCHEDULE_JSON": json.dumps(schedule)}
    return Cluster(tmp_path, {**FAST, **(settings or {})}, env=env)


def _collect(queue: str, until: float, got: list[dict[str, Any]]) -> None:
    """Read what the broker holds into ``got`` until the monotonic time ``until``."""
    while time.monotonic() < until:
        got.extend(received(project_app, queue, wait=0.2))


@pytest.mark.multiprocess
def test_a_beat_schedule_entry_runs_once_per_tick_after_the_switch(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """DatabaseScheduler ran first (and mirrored the entry into a ``PeriodicTask`` row),
    then the LeaderScheduler: one schedule, one message per tick, as before the switch."""
    queue = f"switch-{uuid.uuid4().hex[:8]}"
    cluster = _cluster(tmp_path, queue)
    request.addfinalizer(cluster.stop)

    old = cluster.start_celery_beat(DATABASE_SCHEDULER)
    before: list[dict[str, Any]] = []
    poll("DatabaseScheduler's third message", lambda: _collect_some(queue, before, 3), timeout=60)
    old.process.terminate()
    old.process.wait(15)
    before.extend(received(project_app, queue, wait=0.5))
    assert {h.get("periodic_task_name") for h in before} == {"every-two"}, before[:2]

    cluster.start(1, beat=True)
    after: list[dict[str, Any]] = []
    poll("the LeaderScheduler's first message", lambda: _collect_some(queue, after, 1), timeout=60)
    window = 20.0
    started = time.monotonic()
    _collect(queue, started + window, after)
    cluster.stop()
    after.extend(received(project_app, queue, wait=0.5))

    keys = sorted({h["cluster_context"]["schedule"] for h in after})
    ticks = sorted(datetime.fromisoformat(h["cluster_context"]["tick"]) for h in after)
    print(
        f"switch: DatabaseScheduler sent {len(before)}; then the LeaderScheduler sent "
        f"{len(after)} in ~{window + 2:.0f} s from {keys}"
    )
    assert keys == ["periodic:every-two"], "one schedule per name across sources"
    assert {h.get("periodic_task_name") for h in after} == {"every-two"}
    # Every header DatabaseScheduler's messages had, with the same value where it names
    # the schedule rather than the message.
    assert set(before[0]) <= set(after[0]), set(before[0]) - set(after[0])
    for name in ("periodic_task_name", "celery_beat_task", "task", "argsrepr", "kwargsrepr"):
        assert after[0][name] == before[0][name], name
    gaps = {later - earlier for earlier, later in itertools.pairwise(ticks)}
    assert gaps == {timedelta(seconds=EVERY)}, f"one run per tick, every tick: {sorted(gaps)}"
    assert len(after) <= (window + 2) / EVERY + 2, len(after)
    assert "Traceback" not in cluster.logs(), cluster.logs()[-6000:]


def _collect_some(queue: str, got: list[dict[str, Any]], at_least: int) -> bool:
    got.extend(received(project_app, queue))
    return len(got) >= at_least


@pytest.mark.multiprocess
def test_a_database_scheduler_left_running_beside_the_leader_is_reported(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A rolling deploy: the LeaderScheduler leads and counts its runs into the row, then an
    old node's DatabaseScheduler dispatches the same row and saves its bookkeeping (as it
    does every few minutes and when it stops): the leader logs a WARNING, and only then."""
    queue = f"rolling-{uuid.uuid4().hex[:8]}"
    cluster = _cluster(tmp_path, queue, {"beat_refresh_interval": 1.0})
    request.addfinalizer(cluster.stop)
    every = IntervalSchedule.objects.create(every=EVERY, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="every-two", task="demo.ping", interval=every, queue=queue)
    (leader,) = cluster.start(1, beat=True)

    def counted(at_least: int) -> bool:
        return PeriodicTask.objects.get(name="every-two").total_run_count >= at_least

    poll("the leader to count three runs", lambda: counted(3), timeout=60)
    time.sleep(2.5)  # a few more of the leader's own looks (every second)
    assert "bookkeeping moved" not in leader.text(), "the leader's own writes are not another's"

    old = cluster.start_celery_beat(DATABASE_SCHEDULER)
    theirs: list[dict[str, Any]] = []

    def dispatched_by_it() -> bool:
        theirs.extend(h for h in received(project_app, queue) if "cluster_context" not in h)
        return bool(theirs)

    poll("the DatabaseScheduler to dispatch", dispatched_by_it, timeout=60)
    old.process.terminate()  # it saves its bookkeeping as it stops
    old.process.wait(15)
    try:
        poll("the leader's warning", lambda: "bookkeeping moved" in leader.text(), timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()[-8000:]}") from exc
    assert "WARNING cluster_singletons.beat" in leader.text()
    assert "Traceback" not in cluster.logs(), cluster.logs()[-6000:]
