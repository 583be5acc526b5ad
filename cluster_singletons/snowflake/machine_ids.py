"""The machine-id store: 1,024 rows, each leased to at most one process at a time.

Invariants the store keeps:

- Expiry is compared with the database's clock (``Now()``) inside the statement that
  acts on it. An id changes holder only when it is free or its lease has expired; an id
  whose holder is alive is never taken.
- ``holder`` is a fresh token per acquisition: only that lease can renew or release the
  row, and a renewal that touches no row means the id is lost.
- ``high_water_ms`` never falls below the timestamp of an id issued under the machine id:
  a holder reserves timestamps in the row before it may use them, and a new holder starts
  after the mark, so even a host whose clock is behind its predecessor's cannot repeat an id.
- Not fenced by a cluster lease: a machine id is its own lease (``holder`` token and
  expiry), and every write is conditional on the holder's token.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from django.db import transaction
from django.db.models import DateTimeField, ExpressionWrapper, F, Q, Value
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce, Greatest, Now

from cluster_singletons.models import MachineId
from cluster_singletons.snowflake.contract import MAX_MACHINE_ID

logger = logging.getLogger("cluster_singletons.snowflake")


@dataclass(frozen=True, kw_only=True)
class Acquired:
    """A machine id just leased, with its high-water mark before this lease (Unix ms)."""

    machine_id: int
    floor_ms: int


def _expires_in(ttl: float) -> ExpressionWrapper[CombinedExpression]:
    return ExpressionWrapper(Now() + dt.timedelta(seconds=ttl), output_field=DateTimeField())


def _raise_high_water(to_ms: int) -> Greatest:
    return Greatest(Coalesce(F("high_water_ms"), Value(0)), Value(to_ms))


def ensure(*, using: str) -> bool:
    """Create the missing rows of ids 0-1023 (free); return whether any was missing."""
    rows = MachineId.objects.using(using)
    if rows.count() > MAX_MACHINE_ID:
        return False
    rows.bulk_create([MachineId(id=i) for i in range(MAX_MACHINE_ID + 1)], ignore_conflicts=True)
    return True


def acquire(
    *,
    holder: str,
    host: str,
    pid: int,
    ttl: float,
    now_ms: int,
    max_behind_ms: int,
    reserve_until_ms: int,
    using: str,
) -> Acquired | None:
    """Lease a free or expired machine id to ``holder``; None when none can be had.

    - One short transaction: choose a candidate, then take it conditionally. On PostgreSQL
      concurrent acquirers lock different candidates (``FOR UPDATE SKIP LOCKED``); on SQLite
      the IMMEDIATE transaction serialises them.
    - Never-used ids first, then the longest-expired, so a just-expired id is reused last.
    - Skips ids whose high-water mark is ``max_behind_ms`` or more ahead of ``now_ms``
      (this host would have to wait that long before issuing with them).
    - Raises the mark to ``reserve_until_ms`` in the same statement; returns the old one.
    """
    takeable = Q(holder__isnull=True) | Q(expires_at__isnull=True) | Q(expires_at__lte=Now())
    not_ahead = Q(high_water_ms__isnull=True) | Q(high_water_ms__lt=now_ms + max_behind_ms)
    rows = MachineId.objects.using(using)
    with transaction.atomic(using=using):
        candidate = (
            rows.select_for_update(skip_locked=True)
            .filter(takeable, not_ahead)
            .order_by(F("expires_at").asc(nulls_first=True), "id")
            .values_list("id", "high_water_ms")
            .first()
        )
        if candidate is None:
            return None
        machine_id, floor = candidate
        taken = rows.filter(takeable, pk=machine_id).update(
            holder=holder,
            host=host[:255],
            pid=pid,
            acquired_at=Now(),
            renewed_at=Now(),
            expires_at=_expires_in(ttl),
            high_water_ms=_raise_high_water(reserve_until_ms),
        )
    # The candidate row was locked (PostgreSQL) or the database was (SQLite): it is ours.
    assert taken == 1, "a locked candidate machine id changed under its lock"
    return Acquired(machine_id=machine_id, floor_ms=floor or 0)


def renew(machine_id: int, *, holder: str, ttl: float, reserve_until_ms: int, using: str) -> bool:
    """Extend ``holder``'s unexpired lease and raise the high-water mark; False = lost.

    - An expired lease is not renewed even if nobody took it: its holder stopped believing.
    """
    return bool(
        MachineId.objects.using(using)
        .filter(pk=machine_id, holder=holder, expires_at__gt=Now())
        .update(
            renewed_at=Now(),
            expires_at=_expires_in(ttl),
            high_water_ms=_raise_high_water(reserve_until_ms),
        )
    )


def release(machine_id: int, *, holder: str, last_ms: int, using: str) -> bool:
    """Free ``holder``'s machine id at once; its mark becomes ``last_ms``, the last id issued.

    - Only the holder's own lease is touched; the caller has stopped issuing with it.
    """
    return bool(
        MachineId.objects.using(using)
        .filter(pk=machine_id, holder=holder)
        .update(holder=None, expires_at=Now(), high_water_ms=last_ms)
    )
