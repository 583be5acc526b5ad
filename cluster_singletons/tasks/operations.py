"""What operators do to task keys: see which are held, and force one free.

Force-releasing frees the key's lease at the holder's current term (``leases.release``),
so the next run of the key may start at once. The run still in its body is not stopped:
its renewal finds its term over (the key counts as lost) and its fenced writes are
refused. Every release is logged at WARNING.
"""

from __future__ import annotations

import logging

from cluster_singletons.cluster import leases
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.conf import get_settings
from cluster_singletons.tasks import claims
from cluster_singletons.tasks.claims import HeldKey
from cluster_singletons.tasks.keys import TASK_PREFIX

logger = logging.getLogger("cluster_singletons.tasks")


def held_keys() -> list[HeldKey]:
    """The task keys held now, oldest first."""
    settings = get_settings()
    return claims.held(settings.key_prefix + TASK_PREFIX, using=settings.database)


def find(lease: str) -> HeldKey | None:
    """The held task key whose lease is ``lease`` (None: not held now)."""
    return next((key for key in held_keys() if key.lease == lease), None)


def force_release(key: HeldKey, *, who: str) -> bool:
    """Free ``key`` at the term it was seen held in; False if that term had ended."""
    settings = get_settings()
    term = Term(name=key.lease, runner_id=key.holder, epoch=key.epoch)
    released = leases.release(key.holder, terms=[term], using=settings.database)
    if released:
        logger.warning(
            "%s force-released task key %s (epoch %s, held by %s:%s, task %s)",
            who,
            key.lease,
            key.epoch,
            key.host,
            key.pid,
            key.task_id or "unknown",
        )
    return bool(released)
