"""Health statuses, per name (``singleton:<name>``, ``cron:<name>``, ``beat``), as a pure
function of the name's lease, its heartbeat and ``now``:

- ``not_led``: no runner holds its lease (the beat's lease for ``@cron`` functions).
- ``never_executed``: led, but no execution recorded yet; fine during ``stale_grace``
  after the leader started, ``stale`` after (a cron function: fine until its first run
  after the leader started is overdue by ``stale_grace``, so a nightly job is not red
  all day on a fresh install).
- ``failed``: its last execution raised; ``last_error`` says what.
- ``stale``: no execution within ``stale_threshold`` x its expected interval (a cron
  function: its next run overdue by more than ``stale_grace``). For the beat, whose
  engine beats at least every ``beat_refresh_interval``, this is how a beat that hangs
  while its process lives turns the health red.
- ``invalid``: a schedule the beat cannot run (a bad expression, an unknown task...);
  ``last_error`` says why. Not a function of a lease: the beat's record of the schedule.
- ``healthy``.

A runner registration is ``live``, ``stopping`` or ``gone`` (``runner_state``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from cluster_singletons.models import Heartbeat, Lease

HEALTHY, STALE, NEVER, FAILED, NOT_LED = "healthy", "stale", "never_executed", "failed", "not_led"
INVALID = "invalid"
UNHEALTHY = frozenset({STALE, FAILED, NOT_LED, INVALID})

#: When a heartbeat at the given time goes stale (``None``: never).
Deadline = Callable[[datetime], datetime | None]


def status(
    lease: Lease | None,
    beat: Heartbeat | None,
    now: datetime,
    *,
    grace: timedelta,
    deadline: Deadline,
    first: Deadline | None = None,
) -> str:
    """The status of one name from its lease and heartbeat at ``now`` (a pure function).

    ``first``: when a name that never executed goes stale, given when its leader started
    (default: ``grace`` after that)."""
    if lease is None or lease.holder_id is None or not lease.expires_at or lease.expires_at <= now:
        return NOT_LED
    assert lease.acquired_at is not None
    grace_end = lease.acquired_at + grace
    if beat is not None and beat.failed_at and (not beat.beat_at or beat.failed_at > beat.beat_at):
        return FAILED
    if beat is None or beat.beat_at is None:
        first_at = grace_end if first is None else first(lease.acquired_at)
        return NEVER if first_at is None or now <= max(first_at, grace_end) else STALE
    stale_at = deadline(beat.beat_at)
    return STALE if stale_at is not None and now > max(stale_at, grace_end) else HEALTHY


LIVE, STOPPING, GONE = "live", "stopping", "gone"


def runner_state(
    *, last_seen: datetime, stopping: bool, session_gone: bool, now: datetime, ttl: float
) -> str:
    """What a runner registration says of its process at ``now`` (a pure function):
    ``gone`` when not seen for ``ttl`` (or its PostgreSQL session ended), ``stopping``
    while it hands off, else ``live``."""
    if session_gone or now - last_seen > timedelta(seconds=ttl):
        return GONE
    return STOPPING if stopping else LIVE
