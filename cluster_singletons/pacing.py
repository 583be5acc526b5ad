"""Process-time pacing: capped exponential backoff, and how long a lease is believed held.

Both are pure; they decide how long to wait or to keep acting, never who leads (the
database's clock decides that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster_singletons.conf import ClusterSettings


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delay before the next retry: ``initial * 2**failures``, capped at ``maximum``."""

    initial: float
    maximum: float
    failures: int = 0

    @classmethod
    def from_settings(cls, settings: ClusterSettings, *, failures: int = 0) -> Backoff:
        """The backoff every retry loop of the package uses: ``retry_backoff`` doubling up
        to ``retry_backoff_max``."""
        return cls(
            initial=settings.retry_backoff, maximum=settings.retry_backoff_max, failures=failures
        )

    @property
    def delay(self) -> float:
        return float(min(self.maximum, self.initial * (2 ** min(self.failures, 32))))

    def failed(self) -> Backoff:
        return replace(self, failures=self.failures + 1)

    def reset(self) -> Backoff:
        return replace(self, failures=0)


def belief_window(ttl: float) -> float:
    """How long after sending a renewal a holder may act on a lease of ``ttl`` seconds.

    Measured from *before* the statement was sent, by the holder's monotonic clock, and a
    margin (a tenth of the TTL, at most a second) short of the TTL: the holder stops
    believing before the database can give the lease to anyone else.
    """
    return ttl - min(1.0, ttl / 10)
