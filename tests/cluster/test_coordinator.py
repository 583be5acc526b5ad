"""The coordinator loop driven step by step with a frozen clock, on the real database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

import pytest
from django.db import OperationalError
from django.db.models.functions import Now

from cluster_singletons.clock import FrozenClock
from cluster_singletons.cluster import fencing, leases, membership, placement
from cluster_singletons.cluster.leadership import Leadership, idle
from cluster_singletons.cluster.runner import Runner
from cluster_singletons.conf import ClusterSettings
from cluster_singletons.models import Lease
from cluster_singletons.models import Runner as RunnerRow
from cluster_singletons.singletons.registry import LEASE_PREFIX
from project.demo.localcluster import poll
from tests.tcpproxy import end_session

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

SETTINGS = ClusterSettings(
    lease_ttl=10,
    renew_interval=3,
    acquire_interval=0.5,
    retry_backoff=1,
    retry_backoff_max=4,
    crash_detection="ttl",
)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def made() -> Iterator[list[Runner]]:
    runners: list[Runner] = []
    yield runners
    for runner in runners:
        runner._abandon()


def _runner(work: dict[str, object], clock: FrozenClock, made: list[Runner]) -> Runner:
    runner = Runner(work, settings=SETTINGS, clock=clock)  # type: ignore[arg-type]
    made.append(runner)
    assert runner.register()
    return runner


def test_leader_that_cannot_renew_stops_believing_before_the_lease_can_expire(
    clock: FrozenClock, made: list[Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner({"beat": idle}, clock, made)
    runner.step(clock.monotonic())
    assert runner.leads("beat")

    def unreachable(*args: object, **kwargs: object) -> set[str]:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(leases, "renew", unreachable)
    monkeypatch.setattr(leases, "release", unreachable)
    elapsed = 0.0
    while runner.leads("beat"):
        clock.advance(0.25)
        elapsed += 0.25
        runner.step(clock.monotonic())
        assert elapsed < SETTINGS.lease_ttl, "still believed it leads after a whole TTL"
    # It let go a margin before the TTL, and the database still shows the lease unexpired:
    # no other runner could have taken it while this one still believed it led.
    assert elapsed <= SETTINGS.lease_ttl - 1.0
    assert Lease.objects.filter(name="beat", expires_at__gt=Now()).exists()


@pytest.mark.postgres
def test_a_leader_whose_session_the_server_ended_renews_at_its_next_attempt(
    clock: FrozenClock, made: list[Runner]
) -> None:
    runner = _runner({"beat": idle}, clock, made)
    runner.step(clock.monotonic())
    assert runner.leads("beat")
    end_session()  # the database restarts; the coordinator's connection is closed
    clock.advance(SETTINGS.renew_interval)
    runner.step(clock.monotonic())  # the renewal fails, and drops the connection
    expires = Lease.objects.get(name="beat").expires_at
    clock.advance(SETTINGS.retry_backoff)
    runner.step(clock.monotonic())
    assert runner.leads("beat")
    assert Lease.objects.get(name="beat").expires_at > expires, "renewed on a new connection"


def test_work_that_raises_is_restarted_with_capped_backoff_while_leading(
    clock: FrozenClock, made: list[Runner]
) -> None:
    calls: list[int] = []

    def flaky(leadership: Leadership) -> None:
        calls.append(leadership.term.epoch)
        raise RuntimeError("boom")

    runner = _runner({"job": flaky}, clock, made)
    runner.step(clock.monotonic())
    delays = []
    for attempt in range(1, 5):
        poll(
            "the work to fail",
            lambda n=attempt: len(calls) == n and not _work_alive(runner),
            timeout=10,
        )
        failed_at = clock.monotonic()
        runner.step(failed_at)  # notices the failure and schedules the restart
        restart_at = runner._slots["job"].restart_at
        assert restart_at is not None
        delays.append(restart_at - failed_at)
        clock.advance(restart_at - failed_at - 0.25)
        runner.step(clock.monotonic())
        assert len(calls) == attempt and not _work_alive(runner), "restarted before its delay"
        clock.advance(0.25)
        runner.step(clock.monotonic())
        poll("the restart", lambda n=attempt: len(calls) == n + 1, timeout=10)
    assert delays == [1.0, 2.0, 4.0, 4.0]
    assert runner.leads("job") and set(calls) == {1}


def test_refused_fenced_write_ends_the_term_at_once(clock: FrozenClock, made: list[Runner]) -> None:
    deposed = threading.Event()

    def writer(leadership: Leadership) -> None:
        Lease.objects.filter(name="job").update(epoch=leadership.term.epoch + 1)  # taken over
        try:
            with leadership.fenced():
                pass
        finally:
            deposed.set()

    runner = _runner({"job": writer}, clock, made)
    runner.step(clock.monotonic())
    assert deposed.wait(10)
    poll("the work to end", lambda: not _work_alive(runner), timeout=10)
    runner.step(clock.monotonic())
    assert not runner.leads("job")


def test_stop_releases_every_lease_at_once_and_deregisters() -> None:
    runner = Runner({"beat": idle, "job": idle}, settings=SETTINGS)
    runner.start()
    try:
        poll("both leases", lambda: runner.leads("beat") and runner.leads("job"), timeout=10)
    finally:
        runner.stop()
        assert runner.join(10)
    assert runner.error is None
    assert not Lease.objects.filter(holder__isnull=False).exists()
    assert not RunnerRow.objects.exists()


def test_key_prefix_namespaces_lease_names(clock: FrozenClock, made: list[Runner]) -> None:
    runner = Runner(
        {"beat": idle}, settings=SETTINGS.model_copy(update={"key_prefix": "shop:"}), clock=clock
    )
    made.append(runner)
    assert runner.register()
    runner.step(clock.monotonic())
    assert runner.leads("beat")
    assert list(Lease.objects.values_list("name", flat=True)) == ["shop:beat"]


def test_leader_work_runs_on_the_database_clock_and_not_before_a_renewal_told_it(
    clock: FrozenClock, made: list[Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[datetime] = []

    def work(leadership: Leadership) -> None:
        seen.append(leadership.clock.now())
        leadership.stop_event.wait()

    runner = _runner({"beat": work}, clock, made)
    touch = membership.touch

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(membership, "touch", unreachable)
    runner.step(clock.monotonic())
    clock.advance(SETTINGS.acquire_interval)
    runner.step(clock.monotonic())
    assert not runner.leads("beat"), "took a lease before knowing the database's clock"
    monkeypatch.setattr(membership, "touch", touch)
    clock.advance(SETTINGS.retry_backoff)
    runner.step(clock.monotonic())
    assert runner.leads("beat")
    poll("the work to read its clock", lambda: seen, timeout=10)
    # This runner's wall clock (frozen at 2026-01-01) is not the database's.
    database = fencing.database_now("default")
    assert abs((seen[0] - database).total_seconds()) < 1.0
    wall_behind = (database - clock.now()).total_seconds()
    clock.advance(SETTINGS.renew_interval)
    runner.step(clock.monotonic())
    row = RunnerRow.objects.get(pk=runner.runner_id)
    assert row.clock_offset == pytest.approx(wall_behind, abs=1.0)


def _work_alive(runner: Runner) -> bool:
    return any(
        slot.thread is not None and slot.thread.is_alive() for slot in runner._slots.values()
    )


# -- placement: in-process runners on one frozen clock ------------------------------------


class _Cluster:
    """Runners placing ``names`` over themselves, each stepped when its loop would be: at the
    time its last step returned, or at once when woken (work ended, as ``Runner.run``)."""

    def __init__(self, names: list[str], clock: FrozenClock, made: list[Runner]) -> None:
        self.names, self.clock, self.made = names, clock, made
        self.due: dict[Runner, float] = {}

    def join(self) -> Runner:
        runner = Runner(
            dict.fromkeys(self.names, idle),
            settings=SETTINGS,
            clock=self.clock,
            placement_prefix=LEASE_PREFIX,
        )
        self.made.append(runner)
        assert runner.register()
        self.due[runner] = self.clock.monotonic()
        return runner

    def run(self, seconds: float) -> None:
        until = self.clock.monotonic() + seconds
        while True:
            now = self.clock.monotonic()
            ready = [r for r, at in self.due.items() if at <= now or r._wake.is_set()]
            for runner in ready:
                runner._wake.clear()
                self.due[runner] = runner.step(now)
                # Work told to stop ends on its own thread; wait for it (real time, not the
                # clock), so the runner's wake-up comes at this instant, as it would.
                poll("stepped-down work to end", lambda r=runner: not _stopping(r), timeout=10)
            if not ready:
                next_at = min(self.due.values())
                if next_at > until:
                    self.clock.advance(until - now)
                    return
                self.clock.advance(next_at - now)

    def held(self) -> list[int]:
        """Unexpired placed leases per runner, by the database, every runner listed."""
        rows = Lease.objects.filter(
            name__startswith=LEASE_PREFIX, holder__isnull=False, expires_at__gt=Now()
        ).values_list("holder_id", flat=True)
        return sorted(sum(1 for holder in rows if holder == r.runner_id) for r in self.due)

    def epochs(self) -> int:
        return sum(Lease.objects.values_list("epoch", flat=True))


def _stopping(runner: Runner) -> bool:
    return any(s.term is None and s.alive for s in runner._slots.values())


#: When the newcomer registers, after the others' renewal: at it, just after it (the longest
#: they take to see the newcomer), half an interval after it.
@pytest.mark.parametrize("phase", [0.0, 0.1, 1.5])
@pytest.mark.parametrize(("runners", "singletons"), [(2, 7), (3, 10), (4, 30), (4, 100)])
def test_placement_settles_within_two_renewals_of_a_runner_joining_then_nothing_moves(
    clock: FrozenClock, made: list[Runner], runners: int, singletons: int, phase: float
) -> None:
    cluster = _Cluster([f"{LEASE_PREFIX}p{i}" for i in range(singletons)], clock, made)
    for _ in range(runners - 1):
        cluster.join()
    cluster.run(4 * SETTINGS.renew_interval + phase)
    share = placement.fair_share(singletons, runners - 1)
    assert sum(cluster.held()) == singletons and max(cluster.held()) <= share
    cluster.join()
    cluster.run(2 * SETTINGS.renew_interval)
    held, share = cluster.held(), placement.fair_share(singletons, runners)
    assert sum(held) == singletons, held
    assert max(held) <= share, f"not settled two renewals after a runner joined: {held}"
    epochs = cluster.epochs()
    cluster.run(5 * SETTINGS.renew_interval)
    assert cluster.held() == held
    assert cluster.epochs() == epochs, "a lease changed hands once every runner was at its share"


def test_a_runner_handing_off_many_leases_says_so_in_one_line(
    clock: FrozenClock, made: list[Runner], caplog: pytest.LogCaptureFixture
) -> None:
    cluster = _Cluster([f"{LEASE_PREFIX}p{i}" for i in range(40)], clock, made)
    cluster.join()
    cluster.run(4 * SETTINGS.renew_interval)
    caplog.clear()
    cluster.join()
    cluster.run(2 * SETTINGS.renew_interval)
    assert max(cluster.held()) <= placement.fair_share(40, 2), "handed off"
    handoffs = [r for r in caplog.records if "hands off" in r.getMessage()]
    assert len(handoffs) == 1 and "and 15 more" in handoffs[0].getMessage()
    assert not [r for r in caplog.records if "steps down" in r.getMessage() and r.levelno > 10]


def test_a_placement_failure_is_logged_and_the_runner_keeps_leading(
    clock: FrozenClock,
    made: list[Runner],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = _Cluster([f"{LEASE_PREFIX}p{i}" for i in range(3)], clock, made)
    runner = cluster.join()
    cluster.run(SETTINGS.renew_interval)

    def broken(*args: object) -> list[tuple[str, int]]:
        raise ValueError("min() arg is an empty sequence")

    monkeypatch.setattr(placement, "handoff", broken)
    cluster.run(2 * SETTINGS.renew_interval)  # renewals call placement
    assert all(runner.leads(f"{LEASE_PREFIX}p{i}") for i in range(3))
    assert "placement failed" in caplog.text
