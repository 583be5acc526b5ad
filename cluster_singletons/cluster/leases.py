"""The lease store: acquire, renew, release and fence, each one short transaction.

Invariants every function here keeps:

- Expiry is compared with the database's clock (``Now()``) inside the statement that
  acts on it; no node's wall clock decides who leads.
- ``epoch`` rises by one on every acquisition and never otherwise; (holder, epoch) names a
  leadership term uniquely.
- A lease changes hands only if it is free, expired, or (PostgreSQL with crash detection)
  its holder's connection is gone.
- Only the holder of a term can renew or release it; a renewal that touches no row means
  the term is over.
- A fenced write, a transaction (``fenced``) or a single statement (``fence_clause``),
  commits only while its term is current, and before the next term of the lease begins.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from django.db import NotSupportedError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import (
    BooleanField,
    Case,
    DateTimeField,
    ExpressionWrapper,
    F,
    Model,
    Q,
    When,
)
from django.db.models.expressions import CombinedExpression, RawSQL
from django.db.models.functions import Now
from django.db.models.sql import Query

from cluster_singletons.conf import get_settings
from cluster_singletons.errors import LeadershipLost
from cluster_singletons.models import Lease, Runner

#: Advisory-lock namespace (first key of ``pg_advisory_lock(int, int)``): "CSRL".
LIVENESS_LOCK_NAMESPACE = 0x4353524C & 0x7FFFFFFF
#: PostgreSQL channel on which releases are announced, so standbys act at once.
RELEASE_CHANNEL = "cluster_singletons_release"


@dataclass(frozen=True, kw_only=True)
class Term:
    """One leadership term: ``runner_id`` holds lease ``name`` at ``epoch``."""

    name: str
    runner_id: int
    epoch: int


def _expires_in(ttl: float) -> ExpressionWrapper[CombinedExpression]:
    return ExpressionWrapper(Now() + dt.timedelta(seconds=ttl), output_field=DateTimeField())


def ensure(names: Iterable[str], *, using: str) -> None:
    """Create missing lease rows (free, epoch 0); existing rows are left untouched."""
    Lease.objects.using(using).bulk_create(
        [Lease(name=name) for name in names], ignore_conflicts=True
    )


def runner_is_gone(runner: str) -> RawSQL:
    """PostgreSQL: true when runner row alias ``runner`` registered a liveness lock that no
    session holds any more, i.e. its process or connection died."""
    return RawSQL(
        f"""({runner}.liveness_lock AND NOT EXISTS (
                SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = %s::oid AND l.objid = {runner}.id::oid))""",
        (LIVENESS_LOCK_NAMESPACE,),
        output_field=BooleanField(),
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


def takeable(
    names: Iterable[str], *, runner_id: int, ttl: float, crash_detection: bool, using: str
) -> set[str]:
    """Which of ``names`` ``acquire`` could take now (a read; the answer may be stale)."""
    found = Lease.objects.using(using).filter(
        _takeable(crash_detection), _not_handed_off_by(runner_id, ttl), name__in=list(names)
    )
    return set(found.values_list("name", flat=True))


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


def renew(runner_id: int, terms: Iterable[Term], *, ttl: float, using: str) -> set[str]:
    """Extend every unexpired lease of ``terms`` still held at its epoch; return their names.

    - A term missing from the result is over (expired, taken, released, or an operator
      asked for a handoff): its holder must step down.
    - One UPDATE for all terms, so renewal cost does not grow with round trips.
    """
    terms = list(terms)
    if not terms:
        return set()
    same_term = functools.reduce(operator.or_, (Q(name=t.name, epoch=t.epoch) for t in terms))
    held = Lease.objects.using(using).filter(
        same_term, holder_id=runner_id, handoff_requested=False
    )
    with bounded(using=using, ttl=ttl):
        held.filter(expires_at__gt=Now()).update(renewed_at=Now(), expires_at=_expires_in(ttl))
        # Rows we just renewed are locked by us; unrenewed ones have already expired.
        return set(held.filter(expires_at__gt=Now()).values_list("name", flat=True))


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


@contextmanager
def bounded(*, using: str, ttl: float) -> Iterator[None]:
    """A transaction that, on PostgreSQL, the server ends if its session sits idle inside
    it for ``ttl`` (a paused process): the row locks it holds (a renewal's, an
    acquisition's, a fenced write's) cannot block the other runners for longer."""
    with transaction.atomic(using=using):
        if connections[using].vendor == "postgresql":
            with connections[using].cursor() as cursor:
                cursor.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                    [str(max(1, int(ttl * 1000)))],
                )
        yield


@contextmanager
def fenced(term: Term, *, using: str, ttl: float) -> Iterator[None]:
    """A transaction that commits only while ``term`` is the current leadership term.

    - Raises ``LeadershipLost`` (before running the body) unless the lease is held by
      ``term.runner_id`` at ``term.epoch`` and unexpired by the database's clock.
    - The lease row stays locked until commit, so no acquisition can slip between the
      check and the commit: every fenced write of a term commits before the next term.
    - On PostgreSQL a session left idle inside the transaction (a paused process) is
      ended by the server after ``ttl``, so it cannot block the next leader for longer.
    - Keep the body short: it delays renewals of the same lease.
    """
    with bounded(using=using, ttl=ttl):
        still_ours = (
            Lease.objects.using(using)
            .select_for_update(no_key=True)
            .filter(
                name=term.name,
                holder_id=term.runner_id,
                epoch=term.epoch,
                expires_at__gt=Now(),
            )
            .values_list("epoch", flat=True)
        )
        if not list(still_ours):
            raise LeadershipLost(term.name, term.runner_id, term.epoch)
        yield


def now_sql(connection: BaseDatabaseWrapper) -> str:
    """The database's clock as the ORM writes ``Now()`` for ``connection``, so that raw SQL
    stores and compares time exactly as the ORM statements of this package do."""
    sql, params = Query(Lease).get_compiler(connection=connection).compile(Now())
    assert isinstance(sql, str) and not params, (sql, params)
    return sql


def _term_is_current(connection: BaseDatabaseWrapper) -> str:
    """SQL: ``fenced()``'s test, on the lease row named by ``fence_params``' values."""
    q = connection.ops.quote_name
    name, holder, epoch, expires = (
        f"{q(Lease._meta.db_table)}.{q(column)}"
        for column in ("name", "holder_id", "epoch", "expires_at")
    )
    return f"{name} = %s AND {holder} = %s AND {epoch} = %s AND {expires} > {now_sql(connection)}"


def fence_clause(connection: BaseDatabaseWrapper) -> str:
    """SQL condition that fences a single write statement; its parameters: ``fence_params``.

    - True only while the lease is held by the term's runner at its epoch and unexpired by
      the database's clock: the test ``fenced()`` makes.
    - On PostgreSQL it locks the lease row (``FOR NO KEY UPDATE``, as ``fenced()``) until the
      statement's transaction ends, so an acquisition waits and the write commits before
      the next term begins. SQLite runs one write statement at a time, so check and write
      are one step there.
    - Other databases are refused, rather than fenced without a lock.
    """
    if connection.vendor == "postgresql":
        lock = " FOR NO KEY UPDATE"
    elif connection.vendor == "sqlite":
        lock = ""
    else:
        raise NotSupportedError(
            f"fenced statements need PostgreSQL or SQLite, not {connection.display_name}"
        )
    lease = connection.ops.quote_name(Lease._meta.db_table)
    return f"EXISTS (SELECT 1 FROM {lease} WHERE {_term_is_current(connection)}{lock})"


def fence_params(term: Term) -> list[str | int]:
    """The parameters of ``fence_clause`` for ``term``, in order."""
    return [term.name, term.runner_id, term.epoch]


def insert_sql(
    connection: BaseDatabaseWrapper, model: type[Model], columns: Sequence[str], *, fenced: bool
) -> str:
    """SQL: insert one ``model`` row unless a row with the same unique key exists.

    - Parameters: one per column of ``columns``, then ``fence_params`` when ``fenced``; the
      other columns take their database defaults (``db_default``, e.g. the database's clock).
    - Inserts nothing, without an error, on a conflict or (``fenced``) outside the term: the
      caller tells the two apart with ``ensure_held``.
    """
    q = connection.ops.quote_name
    values = ", ".join("%s" for _ in columns)
    where = f" WHERE {fence_clause(connection)}" if fenced else ""
    return (
        f"INSERT INTO {q(model._meta.db_table)} ({', '.join(map(q, columns))})"
        f" SELECT {values}{where} ON CONFLICT DO NOTHING"
    )


def statement_fence(term: Term, *, using: str, ttl: float) -> AbstractContextManager[None]:
    """What runs around one statement guarded by ``fence_clause``.

    - In autocommit: nothing; the statement is its own transaction.
    - Inside an outer transaction, which keeps the lease row locked until it ends:
      ``fenced()``, so that on PostgreSQL a paused process's session still ends after ``ttl``.
    """
    if transaction.get_connection(using).in_atomic_block:
        return fenced(term, using=using, ttl=ttl)
    return nullcontext()


@functools.cache
def _term_is_current_sql(using: str) -> str:
    connection = connections[using]
    lease = connection.ops.quote_name(Lease._meta.db_table)
    return f"SELECT 1 FROM {lease} WHERE {_term_is_current(connection)}"


def ensure_held(term: Term, *, using: str) -> None:
    """Raise ``LeadershipLost`` unless ``term`` is current (one read, no lock).

    The failure path of a fenced statement: it tells a lost term from the statement's own
    conditions. A term once lost stays lost (expired leases are not renewed), so the answer
    cannot be "held" for a term the statement found lost.
    """
    with connections[using].cursor() as cursor:
        cursor.execute(_term_is_current_sql(using), fence_params(term))
        if cursor.fetchone() is None:
            raise LeadershipLost(term.name, term.runner_id, term.epoch)
