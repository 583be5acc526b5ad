"""Durable delayed delivery at the path users import it from; it lives in ``beat.deliveries``."""

from __future__ import annotations

from cluster_singletons.beat.deliveries import cancel, deliver_at, deliver_in

__all__ = ["cancel", "deliver_at", "deliver_in"]
