"""Health statuses as a pure function of a lease, a heartbeat and ``now`` (unsaved rows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cluster_singletons.health.status import FAILED, HEALTHY, NEVER, NOT_LED, STALE, status
from cluster_singletons.models import Heartbeat, Lease

pytestmark = pytest.mark.unit

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=30)


def _lease(*, held: bool = True, expires_in: float = 10.0) -> Lease:
    return Lease(
        name="singleton:x",
        holder_id=1 if held else None,
        acquired_at=T0,
        expires_at=T0 + timedelta(minutes=5, seconds=expires_in),
    )


def _beat(*, ok_at: float | None = None, failed_at: float | None = None) -> Heartbeat:
    at = lambda s: None if s is None else T0 + timedelta(seconds=s)  # noqa: E731
    return Heartbeat(
        name="singleton:x", runner_id=1, epoch=1, beat_at=at(ok_at), failed_at=at(failed_at)
    )


def _status(lease: Lease | None, beat: Heartbeat | None, after: float) -> str:
    deadline = lambda last: last + timedelta(seconds=60)  # noqa: E731
    return status(lease, beat, T0 + timedelta(seconds=after), grace=GRACE, deadline=deadline)


def test_no_holder_or_an_expired_lease_is_not_led() -> None:
    assert _status(None, None, 1) == NOT_LED
    assert _status(_lease(held=False), None, 1) == NOT_LED
    assert _status(_lease(expires_in=-400), _beat(ok_at=0), 1) == NOT_LED


def test_never_executed_is_fine_during_the_grace_then_stale() -> None:
    assert _status(_lease(), None, 30) == NEVER
    assert _status(_lease(), None, 31) == STALE


def test_a_heartbeat_is_healthy_until_its_deadline() -> None:
    assert _status(_lease(), _beat(ok_at=100), 160) == HEALTHY
    assert _status(_lease(), _beat(ok_at=100), 161) == STALE


def test_a_failure_after_the_last_success_is_failed_and_a_later_success_clears_it() -> None:
    assert _status(_lease(), _beat(ok_at=100, failed_at=110), 120) == FAILED
    assert _status(_lease(), _beat(ok_at=120, failed_at=110), 130) == HEALTHY


def test_a_new_leader_is_not_stale_within_its_grace_even_with_an_old_heartbeat() -> None:
    lease = _lease()
    old = _beat(ok_at=-3600)
    assert _status(lease, old, 20) == HEALTHY
    assert _status(lease, old, 31) == STALE


def test_a_cron_function_never_run_is_never_executed_until_its_first_due_time_and_grace() -> None:
    # A nightly job whose leader started at noon: its first run is due at 03:00 tomorrow.
    first_due = T0.replace(hour=3) + timedelta(days=1)
    first = lambda since: first_due + GRACE  # noqa: E731
    deadline = lambda last: None  # noqa: E731
    held = _lease(expires_in=7 * 86400)

    def at(now: datetime) -> str:
        return status(held, None, now, grace=GRACE, deadline=deadline, first=first)

    assert at(T0 + timedelta(seconds=31)) == NEVER, "not due yet: not stale"
    assert at(T0 + timedelta(hours=14)) == NEVER
    assert at(first_due + GRACE) == NEVER
    assert at(first_due + GRACE + timedelta(seconds=1)) == STALE
    never = lambda since: None  # noqa: E731
    assert (
        status(held, None, T0 + timedelta(days=6), grace=GRACE, deadline=deadline, first=never)
        == NEVER
    ), "a schedule with no tick left is never stale"
