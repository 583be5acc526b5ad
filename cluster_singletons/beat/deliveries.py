"""Durable delayed delivery: a Celery task stored in the database until it is due.

``deliver_at(signature, when)`` replaces a long ``eta``/``countdown``: those sit in a
worker's memory until due, are lost with an unacknowledged message on some brokers and
redelivered on Redis once they outlive ``visibility_timeout``. A delivery is a row; the
leading beat claims it when due and publishes it once. Until then it can be cancelled.

The writes (their invariants), and whether each is fenced:

- ``deliver_at``: an application's insert (a Snowflake id, status ``pending``, this
  deployment's ``key_prefix``); every other statement sees only that deployment's rows.
- ``cancel``: ``pending`` -> ``cancelled`` in one conditional statement; a delivery
  already claimed cannot be cancelled (``DeliveryNotCancellable``).
- ``claim``: fenced on the beat's term, in one transaction that marks the deliveries
  dispatched and records them in the run ledger (schedule ``delivery:<id>``): a deposed
  leader claims nothing, and a claimed delivery is in the ledger exactly once.

``upcoming`` and ``pending_count`` are reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models.functions import Now

from cluster_singletons import deployment
from cluster_singletons.beat import ledger
from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import DeliveryNotCancellable
from cluster_singletons.models import Delivery, Run
from cluster_singletons.snowflake import generate_id

#: Signature options that make no sense for a stored task: the delivery decides when.
_TIMING_OPTIONS = ("eta", "countdown")


def deliver_at(signature: Any, when: datetime, *, using: str | None = None) -> int:
    """Store ``signature`` (a Celery ``Signature``) to be dispatched once at ``when``
    (aware); returns the delivery's id, for ``cancel``."""
    if when.tzinfo is None:
        raise ValueError("deliver_at needs an aware datetime (it has no time zone)")
    task = getattr(signature, "task", None)
    if not isinstance(task, str) or not task:
        raise TypeError(f"deliver_at needs a Celery signature with a task name, not {signature!r}")
    options = {k: v for k, v in dict(signature.options).items() if k not in _TIMING_OPTIONS}
    options.pop("task_id", None)  # the ledger gives the dispatch its own deterministic id
    message = json.dumps(
        {"args": list(signature.args), "kwargs": dict(signature.kwargs), "options": options}
    )
    delivery = Delivery.objects.using(using or get_settings().database).create(
        id=generate_id(),
        task=task,
        message=message,
        due_at=when.astimezone(UTC),
        key_prefix=deployment.prefix(),
    )
    return delivery.id


def deliver_in(signature: Any, delay: float | timedelta, *, using: str | None = None) -> int:
    """``deliver_at(signature, now + delay)``."""
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    return deliver_at(signature, datetime.now(UTC) + timedelta(seconds=seconds), using=using)


def cancel(delivery_id: int, *, using: str | None = None) -> None:
    """Cancel a pending delivery; ``DeliveryNotCancellable`` if it was dispatched already."""
    db = using or get_settings().database
    changed = (
        Delivery.objects.using(db)
        .filter(id=delivery_id, status=Delivery.Status.PENDING, key_prefix=deployment.prefix())
        .update(status=Delivery.Status.CANCELLED, done_at=Now())
    )
    if not changed:
        status = Delivery.objects.using(db).filter(id=delivery_id).values_list("status", flat=True)
        raise DeliveryNotCancellable(delivery_id, status.first() or "unknown")


def upcoming(*, before: datetime, using: str, limit: int) -> dict[int, datetime]:
    """Pending deliveries due before ``before``: id -> due time."""
    rows = (
        Delivery.objects.using(using)
        .filter(status=Delivery.Status.PENDING, due_at__lt=before, key_prefix=deployment.prefix())
        .order_by("due_at")
        .values_list("id", "due_at")[:limit]
    )
    return dict(rows)


class Upcoming:
    """The pending deliveries the leading beat fetched ahead of their time, fetched
    again every ``poll`` seconds: which are due, and when to look next."""

    def __init__(self, now: datetime, *, poll: float, using: str, limit: int) -> None:
        self._poll, self._using, self._limit = timedelta(seconds=poll), using, limit
        self._next_poll = now
        self._due: dict[int, datetime] = {}

    @property
    def next_at(self) -> datetime:
        """When the next fetch or the first delivery fetched is due."""
        return min([self._next_poll, *self._due.values()])

    def take_due(self, now: datetime) -> list[int]:
        """The ids due by ``now`` (fetching first if a fetch is due), handed out once."""
        if now >= self._next_poll:
            self._next_poll = now + self._poll
            self._due = upcoming(before=self._next_poll, using=self._using, limit=self._limit)
        ready = [i for i, at in self._due.items() if at <= now]
        for delivery_id in ready:
            del self._due[delivery_id]
        return ready


def claim(ids: Sequence[int], *, term: Term, using: str, ttl: float) -> list[Run]:
    """Mark these deliveries dispatched and record them in the ledger, fenced on ``term``;
    cancelled ones are left out. Returns the ledger rows to publish."""
    with fencing.fenced(term, using=using, ttl=ttl):
        rows = list(
            Delivery.objects.using(using)
            .select_for_update()
            .filter(id__in=ids, status=Delivery.Status.PENDING, key_prefix=deployment.prefix())
            .values_list("id", "task", "message", "due_at")
        )
        if not rows:
            return []
        Delivery.objects.using(using).filter(id__in=[r[0] for r in rows]).update(
            status=Delivery.Status.DISPATCHED, done_at=Now()
        )
        intents = [
            ledger.Intent(
                schedule=f"delivery:{delivery_id}",
                tick=due_at,
                kind=Run.Kind.DELIVERY,
                task=task,
                **_decoded(message),
            )
            for delivery_id, task, message, due_at in rows
        ]
        return ledger.record(intents, last_ticks={}, term=None, using=using, ttl=ttl)


def _decoded(message: str) -> dict[str, Any]:
    data = json.loads(message)
    return {"args": data["args"], "kwargs": data["kwargs"], "options": data["options"]}


def pending_count(*, using: str) -> int:
    """How many deliveries wait for their time (a read)."""
    rows = Delivery.objects.using(using).filter(key_prefix=deployment.prefix())
    return rows.filter(status=Delivery.Status.PENDING).count()
