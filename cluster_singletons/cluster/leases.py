"""The lease store: one row per lease; acquire, renew, hand off and release it.

Invariants every function here keeps:

- Expiry is compared with the database's clock (``Now()``) inside the statement that
  acts on it; no node's wall clock decides who leads.
- ``epoch`` rises by one on every acquisition and never otherwise; (holder, epoch) names a
  leadership term uniquely.
- A lease changes hands only if it is free, expired, or (PostgreSQL with crash detection)
  its holder's connection is gone.
- Only the holder of a term can renew or release it; a renewal that touches no row means
  the term is over.
- Every write here runs in a ``bounded`` transaction: a paused holder's row locks last
  no longer than a TTL.
- None of these writes is fenced, and none needs to be: each is conditional on the
  holder and epoch it names, so a deposed leader's renewal or release touches no row of
  a newer term (``handed_off_by``/``handoff_requested`` are only read as hints).

Fencing of a leader's other writes lives in ``fencing``.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import (
    BooleanField,
    Case,
    DateTimeField,
    ExpressionWrapper,
    F,
    Q,
    When,
)
from django.db.models.expressions import CombinedExpression, RawSQL
from django.db.models.functions import Now

from cluster_singletons import deployment
from cluster_singletons.cluster.crash_detection import RELEASE_CHANNEL
from cluster_singletons.cluster.fencing import Term, bounded
from cluster_singletons.cluster.membership import runner_is_gone
from cluster_singletons.conf import get_settings
from cluster_singletons.models import Lease, Runner


def _expires_in(ttl: float) -> ExpressionWrapper[CombinedExpression]:
    return ExpressionWrapper(Now() + dt.timedelta(seconds=ttl), output_field=DateTimeField())


def ensure(names: Iterable[str], *, using: str) -> None:
    """Create missing lease rows (free, epoch 0); existing rows are left untouched."""
    Lease.objects.using(using).bulk_create(
        [Lease(name=name) for name in names], ignore_conflicts=True
    )


def _holder_is_gone() -> RawSQL:
    lease, runner = Lease._meta.db_table, Runner._meta.db_table
    gone = runner_is_gone("r")
    return RawSQL(
        f'EXISTS (SELECT 1 FROM "{runner}" r WHERE r.id = "{lease}".holder_id AND {gone.sql})',
        gone.params,
        output_field=BooleanField(),
    )


def _takeable(crash_detection: bool) -> Q:
    free = Q(holder__isnull=True) | Q(expires_at__isnull=True) | Q(expires_at__lte=Now())
    return free | Q(_holder_is_gone()) if crash_detection else free


def _not_handed_off_by(runner_id: int, ttl: float) -> Q:
    """A runner that handed a lease off leaves it to the others for a TTL."""
    a_ttl_ago = ExpressionWrapper(Now() - dt.timedelta(seconds=ttl), output_field=DateTimeField())
    return ~Q(handed_off_by=runner_id) | Q(expires_at__lte=a_ttl_ago)


@dataclass(frozen=True)
class Standing:
    """What a standby learns from one poll of the leases it stands for."""

    #: The names ``acquire`` could take now (the answer may be stale).
    free: set[str]
    #: Holders of the others that hold a liveness lock: their crash is seen by session.
    watched: set[int]


def takeable(
    names: Iterable[str], *, runner_id: int, ttl: float, crash_detection: bool, using: str
) -> Standing:
    """Which of ``names`` ``acquire`` could take now, and whom to watch for the others
    (one read)."""
    rows = (
        Lease.objects.using(using)
        .filter(name__in=list(names))
        .annotate(
            takeable=ExpressionWrapper(
                _takeable(crash_detection) & _not_handed_off_by(runner_id, ttl),
                output_field=BooleanField(),
            )
        )
        .values_list("name", "takeable", "holder_id", "holder__liveness_lock")
    )
    free, watched = set(), set()
    for name, can_take, holder, lock in rows:
        if can_take:
            free.add(name)
        elif holder is not None and holder != runner_id and lock:
            watched.add(holder)
    return Standing(free=free, watched=watched)


def acquire(
    name: str, runner_id: int, *, ttl: float, using: str, crash_detection: bool = False
) -> Term | None:
    """Take lease ``name`` for ``runner_id`` if it is free, expired or its holder is gone.

    - One conditional UPDATE decides; the row lock makes concurrent acquirers serialise,
      so at most one of them wins a given term.
    - On success the epoch is the previous one plus one.
    - ``crash_detection`` (PostgreSQL only) also takes leases whose holder's liveness lock
      is no longer held, i.e. whose process or connection died.
    """
    with bounded(using=using, ttl=ttl):
        changed = (
            Lease.objects.using(using)
            .filter(_takeable(crash_detection), _not_handed_off_by(runner_id, ttl), name=name)
            .update(
                holder_id=runner_id,
                epoch=F("epoch") + 1,
                acquired_at=Now(),
                renewed_at=Now(),
                expires_at=_expires_in(ttl),
                handoff_requested=False,
                handed_off_by=None,
            )
        )
        if not changed:
            return None
        epoch = Lease.objects.using(using).values_list("epoch", flat=True).get(name=name)
    return Term(name=name, runner_id=runner_id, epoch=epoch)


#: Terms renewed by one statement at most.
_RENEW_CHUNK = 400


def renew(runner_id: int, terms: Iterable[Term], *, ttl: float, using: str) -> set[str]:
    """Extend every unexpired lease of ``terms`` still held at its epoch; return their names.

    - A term missing from the result is over (expired, taken, released, or an operator
      asked for a handoff): its holder must step down.
    - One UPDATE per ``_RENEW_CHUNK`` terms (one for all but the largest holders), in one
      transaction, so renewal cost does not grow with round trips; SQLite cannot parse a
      condition of a thousand terms ("Expression tree is too large").
    """
    terms = list(terms)
    kept: set[str] = set()
    if not terms:  # a standby renews nothing: no transaction for it
        return kept
    with bounded(using=using, ttl=ttl):
        for start in range(0, len(terms), _RENEW_CHUNK):
            chunk = terms[start : start + _RENEW_CHUNK]
            same_term = functools.reduce(
                operator.or_, (Q(name=t.name, epoch=t.epoch) for t in chunk)
            )
            held = Lease.objects.using(using).filter(
                same_term, holder_id=runner_id, handoff_requested=False
            )
            held.filter(expires_at__gt=Now()).update(renewed_at=Now(), expires_at=_expires_in(ttl))
            # Rows we just renewed are locked by us; unrenewed ones have already expired.
            kept.update(held.filter(expires_at__gt=Now()).values_list("name", flat=True))
    return kept


def request_handoff(name: str, *, using: str) -> bool:
    """Ask the holder of lease ``name`` to hand it off: its next renewal leaves it out, so it
    steps down, stops its work and releases the lease for a standby. False if nobody leads."""
    return bool(
        Lease.objects.using(using)
        .filter(name=name, holder__isnull=False, expires_at__gt=Now())
        .update(handoff_requested=True)
    )


def _same_terms(terms: list[Term]) -> Q:
    return functools.reduce(operator.or_, (Q(name=t.name, epoch=t.epoch) for t in terms))


def release(
    runner_id: int, *, using: str, terms: Iterable[Term] | None = None, ttl: float | None = None
) -> list[str]:
    """Free the leases ``runner_id`` holds (all, or only ``terms``); return their names.

    - Only the named terms are released: a lease the runner has since taken again, at a
      newer epoch, is kept.
    - The epoch is kept; the next acquisition raises it.
    - On PostgreSQL the release is announced on ``RELEASE_CHANNEL`` at commit, so standbys
      take over without waiting for their next poll.
    """
    mine = Lease.objects.using(using).filter(holder_id=runner_id)
    if terms is not None:
        terms = list(terms)
        if not terms:
            return []
        mine = mine.filter(_same_terms(terms))
    with bounded(using=using, ttl=ttl or get_settings().lease_ttl):
        released = list(mine.select_for_update().values_list("name", flat=True))
        if not released:
            return []
        Lease.objects.using(using).filter(name__in=released).update(
            holder_id=None,
            expires_at=Now(),
            handoff_requested=False,
            # SQL reads the row as it was: the holder that is handing it off.
            handed_off_by=Case(When(handoff_requested=True, then=F("holder_id")), default=None),
        )
        if connections[using].vendor == "postgresql":
            with connections[using].cursor() as cursor:
                for name in released:
                    cursor.execute("SELECT pg_notify(%s, %s)", [RELEASE_CHANNEL, name])
    return released


def by_name(*, using: str) -> dict[str, Lease]:
    """Every lease row, by name, with its holder's registration (a read)."""
    return {row.name: row for row in Lease.objects.using(using).select_related("holder")}


def rows(*, using: str) -> list[dict[str, Any]]:
    """Every lease as a dict of its public columns, by name (a read, for reports)."""
    columns = ("name", "holder_id", "epoch", "expires_at", "handoff_requested")
    return [dict(row) for row in Lease.objects.using(using).order_by("name").values(*columns)]


def recent_changes(*, using: str, limit: int = 10) -> list[Lease]:
    """This deployment's leases most recently acquired, newest first (a read)."""
    found = Lease.objects.using(using).filter(deployment.leases()).exclude(acquired_at=None)
    found = found.select_related("holder")
    return list(found.order_by("-acquired_at")[:limit])
