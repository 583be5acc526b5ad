"""The database's clock as this process can read it without asking: the estimate of its
offset, and ``DatabaseClock``, the clock the leading beat plans and publishes on.

Each renewal returns the database's time (``membership.touch``); the statement was
sent and answered at known instants of this process's monotonic clock, so the database
read its clock somewhere in between. Each such ``Sample`` bounds the offset
``database time - monotonic time`` to an interval as wide as the round trip (plus the
database clock's resolution); its midpoint is the estimate, half its width the error.

- ``refine`` keeps the intersection of the samples' intervals, each widened with its
  age by ``DRIFT`` (how fast two clocks can drift apart while NTP slews them), so the
  estimate is as good as the best recent round trip and never worse than the newest
  sample; a sample outside the estimate (the database's clock was stepped) replaces it.
- The offset is kept against the monotonic clock, not the wall clock: a local wall
  clock that is wrong, or stepped between renewals, changes nothing.
- ``DatabaseClock.now()`` is the interval's lower end (less drift since): it never runs
  ahead of the database's clock, so no tick planned on it is published early, and lags
  it by at most the estimate's width (about one round trip).
- ``offset`` (the database's clock minus this process's wall clock) is what runner rows,
  ``cluster_status`` and ``cluster_clock_offset_seconds`` show; above
  ``clock_offset_warning`` one WARNING says so, and one INFO line when it is back within.

Nothing here runs a statement: the coordinator passes what its renewal returned.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connections

from cluster_singletons import metrics
from cluster_singletons.clock import Clock
from cluster_singletons.cluster.fencing import now_resolution
from cluster_singletons.conf import ClusterSettings

logger = logging.getLogger("cluster_singletons.runner")

#: Rate (s/s) at which this process's monotonic clock and the database's may drift apart:
#: 500 ppm, the fastest ntpd slews a clock (crystals drift well under 100 ppm). Were it
#: ever exceeded, the newest sample still bounds the error at each renewal.
DRIFT = 5e-4
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One statement that returned the database's clock."""

    #: Monotonic seconds when it was sent and when its answer arrived.
    sent: float
    received: float
    #: The database's clock it returned (Unix seconds).
    database: float
    #: The smallest step of the database's clock (SQLite's ``'now'``: milliseconds).
    resolution: float = 0.0

    def __post_init__(self) -> None:
        if not self.sent <= self.received or self.resolution < 0:
            raise ValueError(
                f"a clock sample needs sent <= received and resolution >= 0, got {self!r}"
            )


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """``database time - monotonic time`` lies within ``[low, high]``, as of monotonic
    ``at``."""

    low: float
    high: float
    at: float

    @property
    def offset(self) -> float:
        return (self.low + self.high) / 2

    @property
    def error(self) -> float:
        """Half the interval: the estimate is off by at most this."""
        return (self.high - self.low) / 2

    def aged(self, at: float, drift: float = DRIFT) -> Estimate:
        """The same knowledge at monotonic ``at``: wider by the drift since."""
        spread = drift * abs(at - self.at)
        return Estimate(low=self.low - spread, high=self.high + spread, at=at)


def bounds(sample: Sample, drift: float = DRIFT) -> Estimate:
    """What one sample says, as of its receipt: the database read its clock between send
    and receipt (and the clocks may have drifted apart since)."""
    spread = drift * (sample.received - sample.sent)
    return Estimate(
        low=sample.database - sample.received - spread,
        high=sample.database + sample.resolution - sample.sent + spread,
        at=sample.received,
    )


def refine(estimate: Estimate | None, sample: Sample, drift: float = DRIFT) -> Estimate:
    """The estimate after ``sample``: the intersection of both, or the sample alone when
    they disagree (the database's clock moved beyond what drift explains)."""
    new = bounds(sample, drift)
    if estimate is None:
        return new
    old = estimate.aged(new.at, drift)
    low, high = max(old.low, new.low), min(old.high, new.high)
    if low > high:
        return new
    return Estimate(low=low, high=high, at=new.at)


class DatabaseClock:
    """A ``Clock`` whose wall time is the database's, estimated from renewals (see the
    module docstring); monotonic time, waiting and sleeping are ``base``'s.

    Thread-safe: the coordinator observes, leader work reads. ``now()`` before the first
    estimate raises: a runner takes no lease until its first renewal gave one.
    """

    def __init__(
        self,
        base: Clock,
        *,
        resolution: float = 0.0,
        warn_above: float = float("inf"),
        drift: float = DRIFT,
    ) -> None:
        self.base = base
        self.resolution, self.warn_above, self.drift = resolution, warn_above, drift
        self._estimate: Estimate | None = None
        #: This process's wall clock minus its monotonic clock, read with the last sample.
        self._wall_lead = 0.0
        self._warned = False
        self._lock = threading.Lock()

    @classmethod
    def of(cls, base: Clock, settings: ClusterSettings) -> DatabaseClock:
        """The clock of a runner on ``settings.database``, warning as its settings say."""
        connection = connections[settings.database]
        return cls(
            base,
            resolution=now_resolution(connection),
            warn_above=settings.clock_offset_warning,
        )

    @property
    def estimate(self) -> Estimate | None:
        return self._estimate

    @property
    def synced(self) -> bool:
        """Whether a renewal has told the database's clock yet."""
        return self._estimate is not None

    def offset(self) -> float | None:
        """The database's clock minus this process's wall clock (seconds), as of the last
        sample; None before the first."""
        estimate = self._estimate
        return None if estimate is None else estimate.offset - self._wall_lead

    def observe(self, sent: float, received: float, database: datetime) -> Estimate:
        """Take in a statement sent and answered at monotonic ``sent``/``received`` that
        returned the database's clock ``database``; logs and exports the new offset."""
        sample = Sample(
            sent=sent,
            received=received,
            database=(database - _EPOCH).total_seconds(),
            resolution=self.resolution,
        )
        with self._lock:
            self._estimate = refine(self._estimate, sample, self.drift)
            self._wall_lead = self.base.time_ns() / 1e9 - self.base.monotonic()
        offset = self.offset()
        assert offset is not None
        metrics.CLOCK_OFFSET.set(offset)
        self._report(offset, self._estimate.error)
        return self._estimate

    def _report(self, offset: float, error: float) -> None:
        above = abs(offset) > self.warn_above
        if above and not self._warned:
            logger.warning(
                "this host's wall clock is %.3f s %s the database's (±%.1f ms), more than "
                "'clock_offset_warning' (%g s): the beat keeps to the database's clock, but "
                "check this host's time synchronisation (NTP)",
                abs(offset),
                "behind" if offset > 0 else "ahead of",
                error * 1000,
                self.warn_above,
            )
        elif self._warned and not above:
            logger.info("this host's wall clock is within %.3f s of the database's", abs(offset))
        self._warned = above

    # -- the Clock protocol ------------------------------------------------------------

    def _lower(self, at: float) -> float:
        estimate = self._estimate
        if estimate is None:
            raise RuntimeError(
                "the database's clock is not known yet: no renewal has returned it "
                "(leader work starts only after one has)"
            )
        return at + estimate.aged(at, self.drift).low

    def now(self) -> datetime:
        """The database's clock, never ahead of it (aware, UTC)."""
        return _EPOCH + timedelta(seconds=self._lower(self.base.monotonic()))

    def time_ns(self) -> int:
        return round(self._lower(self.base.monotonic()) * 1e9)

    def monotonic(self) -> float:
        return self.base.monotonic()

    def monotonic_ns(self) -> int:
        return self.base.monotonic_ns()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return self.base.wait(event, timeout)

    def sleep(self, seconds: float) -> None:
        self.base.sleep(seconds)
