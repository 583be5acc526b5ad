"""Leadership terms and the fence that keeps a leader's writes inside its term.

A ``Term`` names one leadership of one lease (holder and epoch). Every durable effect of
a leader commits only while its term is current:

- ``fenced(term)`` is a transaction that first locks the lease row and checks the term
  (``LeadershipLost`` otherwise), so no acquisition can slip between check and commit;
- ``fence_clause`` / ``fence_params`` put the same check into one write statement, and
  ``ensure_held`` tells a lost term from the statement's own conditions afterwards;
- ``bounded`` is a transaction the server ends (PostgreSQL) if its session sits idle
  inside it for a TTL: a paused process's row locks cannot block the next leader longer.

Time is the database's: ``now_sql`` is the clock the ORM writes for ``Now()``, so raw
statements compare time exactly as the ORM statements of this package do.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import NotSupportedError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model
from django.db.models.functions import Now
from django.db.models.sql import Query

from cluster_singletons.errors import LeadershipLost
from cluster_singletons.models import Lease


@dataclass(frozen=True, kw_only=True)
class Term:
    """One leadership term: ``runner_id`` holds lease ``name`` at ``epoch``."""

    name: str
    runner_id: int
    epoch: int


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


def now_resolution(connection: BaseDatabaseWrapper) -> float:
    """The smallest step of ``now_sql`` in seconds: SQLite's ``'now'`` counts milliseconds."""
    return 0.001 if connection.vendor == "sqlite" else 1e-6


def database_time(value: datetime | str) -> datetime:
    """A value of ``now_sql`` as the driver returned it, aware (SQLite returns text)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


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


def database_now(using: str) -> datetime:
    """The database's clock, read in one statement (aware)."""
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {now_sql(connection)}", [])  # params: %% becomes %
        return database_time(cursor.fetchone()[0])
