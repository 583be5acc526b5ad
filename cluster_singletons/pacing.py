"""Capped exponential backoff, as a pure value object."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delay before the next retry: ``initial * 2**failures``, capped at ``maximum``."""

    initial: float
    maximum: float
    failures: int = 0

    @property
    def delay(self) -> float:
        return float(min(self.maximum, self.initial * (2 ** min(self.failures, 32))))

    def failed(self) -> Backoff:
        return replace(self, failures=self.failures + 1)

    def reset(self) -> Backoff:
        return replace(self, failures=0)
