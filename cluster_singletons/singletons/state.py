"""Typed durable state: a ``StateStore`` over a pydantic model, stored as JSON in a table.

Invariants:

- ``load()`` of an absent key gives the model's defaults (version 0); nothing is written.
- ``save()`` is compare-and-swap on ``version``: it succeeds only if the row is still at
  the version this store last loaded or saved. Bound to a leadership term, it is also
  fenced: a deposed leader's save raises ``LeadershipLost`` and writes nothing.
- A save is one statement (an ``UPDATE``, or an ``INSERT`` of an absent row), the version
  check and the fence in its ``WHERE``; a save that writes nothing raises ``LeadershipLost``
  when the term is over, else ``StateConflict`` (the row moved on, or is quarantined).
- ``modify(fn)`` reads, applies ``fn`` and writes in one transaction.
- A stored value that cannot be decoded is never overwritten or reset silently: the row
  is marked quarantined (its value untouched, a copy kept in history) and
  ``SingletonError(SchemaDecodeFailed)`` is raised until an operator resets or repairs it.
- An older schema version is upgraded on load and persisted, the old value kept in history.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Generic, TypeVar

from django.db import DatabaseError, InterfaceError, connections, transaction
from django.db.models.functions import Now
from pydantic import BaseModel

from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import SingletonConfigError, SingletonError, StateConflict
from cluster_singletons.models import StateHistory, StateRecord
from cluster_singletons.singletons import state_versions

M = TypeVar("M", bound=BaseModel)
_DB_ERRORS = (DatabaseError, InterfaceError)


class StateStore(Generic[M]):
    """Typed state under one key; see the module docstring for the invariants."""

    def __init__(
        self,
        key: str,
        model: type[M],
        *,
        term: Term | None = None,
        owner: str | None = None,
        using: str | None = None,
    ) -> None:
        found = state_versions.problems(model)
        if found:
            raise SingletonConfigError(owner or key, "; ".join(found))
        settings = get_settings()
        self.key = settings.key_prefix + key
        self.model = model
        self.term = term
        self.owner = owner or key
        self.using = using or settings.database
        self._ttl = settings.lease_ttl
        #: The version this store last loaded or saved; 0 = absent; None = not loaded yet.
        self.version: int | None = None

    # -- reading -----------------------------------------------------------------------

    def row(self) -> StateRecord | None:
        """The stored row as it is, undecoded (an operator's view; a read)."""
        return StateRecord.objects.using(self.using).filter(key=self.key).first()

    def load(self) -> M:
        """The stored value (upgraded if older), or the model's defaults when absent."""
        with self._failing_as("StateLoadFailed"):
            row = StateRecord.objects.using(self.using).filter(key=self.key).first()
        if row is None:
            self.version = 0
            return self.model()
        self._refuse_quarantined(row)
        try:
            value = self._upgrade(row)
        except state_versions.DecodeError as exc:
            self._quarantine(row, str(exc))
            raise SingletonError("SchemaDecodeFailed", self.owner, str(exc)) from exc
        self.version = row.version
        return value

    def _refuse_quarantined(self, row: StateRecord) -> None:
        if row.status == StateRecord.Status.QUARANTINED:
            raise SingletonError("SchemaDecodeFailed", self.owner, f"quarantined: {row.problem}")

    def _upgrade(self, row: StateRecord) -> M:
        """Decode ``row``; persist an upgrade (``row.version`` follows). Raises ``DecodeError``."""
        decoded = state_versions.decode(self.model, row.value, row.schema_version)
        value = decoded.value
        assert isinstance(value, self.model)
        if decoded.upgraded_from is not None:
            self._persist_upgrade(row, value)
        return value

    def _quarantine(self, row: StateRecord, problem: str) -> None:
        with self._failing_as("StateLoadFailed"), self._transaction():
            marked = (
                StateRecord.objects.using(self.using)
                .filter(key=row.key, version=row.version, status=StateRecord.Status.OK)
                .update(status=StateRecord.Status.QUARANTINED, problem=problem)
            )
            if marked:
                self._keep(row, StateHistory.Reason.QUARANTINE, problem)

    def _persist_upgrade(self, row: StateRecord, value: M) -> None:
        note = f"upgraded from schema version {row.schema_version}"
        with self._failing_as("StateLoadFailed"), self._transaction():
            self._keep(row, StateHistory.Reason.UPGRADE, note)
            self._write(value, expected=row.version)
        row.version += 1

    # -- writing -----------------------------------------------------------------------

    def save(self, value: M) -> int:
        """Store ``value`` if nothing changed since this store's last load; return the version."""
        if not isinstance(value, self.model):
            raise TypeError(
                f"state {self.key!r} holds {self.model.__name__}, not {type(value).__name__}"
            )
        if self.version is None:
            self.load()
        assert self.version is not None
        with self._failing_as("StatePersistFailed"), self._statement_fence():
            self._write(value, expected=self.version)
        self.version += 1
        return self.version

    def modify(self, fn: Callable[[M], M]) -> M:
        """Apply ``fn`` to the current value and store the result, atomically."""
        problem: str | None = None
        with self._failing_as("StatePersistFailed"), self._transaction():
            row = (
                StateRecord.objects.using(self.using)
                .select_for_update()
                .filter(key=self.key)
                .first()
            )
            if row is not None:
                self._refuse_quarantined(row)
            try:
                current = self.model() if row is None else self._upgrade(row)
            except state_versions.DecodeError as exc:
                problem = str(exc)  # quarantined below, outside this transaction
            else:
                expected = 0 if row is None else row.version
                new = fn(current)
                if not isinstance(new, self.model):
                    raise TypeError(f"modify() function must return {self.model.__name__}")
                self._write(new, expected=expected)
        if problem is not None:
            assert row is not None
            self._quarantine(row, problem)
            raise SingletonError("SchemaDecodeFailed", self.owner, problem)
        self.version = expected + 1
        return new

    def reset(self, note: str = "") -> None:
        """Delete the stored value (kept in history); the next load gives the defaults."""
        with self._transaction():
            rows = list(
                StateRecord.objects.using(self.using).select_for_update().filter(key=self.key)
            )
            for row in rows:
                self._keep(row, StateHistory.Reason.RESET, note)
            StateRecord.objects.using(self.using).filter(key=self.key).delete()
        self.version = 0

    def edit(self, value: M, note: str = "") -> None:
        """An operator's replacement of the stored value (admin, ``singleton_state import``):
        unfenced, the old row kept in history, a quarantine lifted. ``value`` is already a
        validated instance of the model, stored at the model's schema version."""
        with self._transaction():
            row = StateRecord.objects.using(self.using).select_for_update().filter(key=self.key)
            old = row.first()
            if old is not None:
                self._keep(old, StateHistory.Reason.EDIT, note)
            StateRecord.objects.using(self.using).update_or_create(
                key=self.key,
                defaults={
                    "value": value.model_dump_json(),
                    "schema_version": state_versions.version_of(self.model),
                    "version": (old.version if old else 0) + 1,
                    "status": StateRecord.Status.OK,
                    "problem": "",
                    "updated_at": Now(),
                    "updated_epoch": None,
                },
            )
        self.version = None  # a running leader's next save conflicts and reloads

    def _write(self, value: M, *, expected: int) -> None:
        """Compare-and-swap write in one statement, fenced when the store is bound to a term.

        Raises ``LeadershipLost`` when the term is over, else ``StateConflict`` when nothing
        was written (the row moved on, appeared, vanished or is quarantined).
        """
        text = value.model_dump_json()
        version = state_versions.version_of(self.model)
        sql = _save_sql(self.using, fenced=self.term is not None)
        epoch = None if self.term is None else self.term.epoch
        fence = [] if self.term is None else fencing.fence_params(self.term)
        params: list[str | int | None]
        if expected == 0:
            statement = sql.insert
            params = [self.key, text, version, 1, StateRecord.Status.OK, "", epoch, *fence]
        else:
            statement = sql.update
            params = [text, version, epoch, self.key, expected, StateRecord.Status.OK, *fence]
        with connections[self.using].cursor() as cursor:
            cursor.execute(statement, params)
            written = cursor.rowcount
        if written == 1:
            return
        if self.term is not None:
            fencing.ensure_held(self.term, using=self.using)
        raise StateConflict(self.key, expected)

    @contextmanager
    def _failing_as(self, reason: str) -> Iterator[None]:
        """Report a conflict or a database error as ``SingletonError(reason)``."""
        try:
            yield
        except (StateConflict, *_DB_ERRORS) as exc:
            raise SingletonError(reason, self.owner, exc) from exc

    def _keep(self, row: StateRecord, reason: str, note: str) -> None:
        StateHistory.objects.using(self.using).create(
            key=row.key,
            value=row.value,
            schema_version=row.schema_version,
            version=row.version,
            reason=reason,
            note=note,
        )

    def _transaction(self) -> AbstractContextManager[None]:
        if self.term is not None:
            return fencing.fenced(self.term, using=self.using, ttl=self._ttl)
        return _atomic(self.using)

    def _statement_fence(self) -> AbstractContextManager[None]:
        """Around ``_write`` alone: its statement is fenced and atomic by itself."""
        if self.term is not None:
            return fencing.statement_fence(self.term, using=self.using, ttl=self._ttl)
        return nullcontext()


#: The columns an insert sets; ``updated_at`` takes its default, the database's clock.
_INSERTED = ("key", "value", "schema_version", "version", "status", "problem", "updated_epoch")


@dataclass(frozen=True)
class _SaveSql:
    """The statements of a save: ``update`` moves the row on from the expected version,
    ``insert`` creates an absent row (version 1); each is fenced or not as a whole."""

    update: str
    insert: str


@functools.cache
def _save_sql(using: str, *, fenced: bool) -> _SaveSql:
    """Built once per database alias: the text depends only on its vendor and the tables."""
    connection = connections[using]
    q = connection.ops.quote_name
    key, value, schema_version, version, status, updated_at, updated_epoch = map(
        q, ("key", "value", "schema_version", "version", "status", "updated_at", "updated_epoch")
    )
    fence = f" AND {fencing.fence_clause(connection)}" if fenced else ""
    update = (
        f"UPDATE {q(StateRecord._meta.db_table)} SET {value} = %s, {schema_version} = %s,"
        f" {version} = {version} + 1, {updated_at} = {fencing.now_sql(connection)},"
        f" {updated_epoch} = %s WHERE {key} = %s AND {version} = %s AND {status} = %s{fence}"
    )
    return _SaveSql(
        update=update,
        insert=fencing.insert_sql(connection, StateRecord, _INSERTED, fenced=fenced),
    )


@contextmanager
def _atomic(using: str) -> Iterator[None]:
    with transaction.atomic(using=using):
        yield


def state_store(key: str, model: type[M], *, using: str | None = None) -> StateStore[M]:
    """A store usable outside singletons: compare-and-swap, not fenced."""
    return StateStore(key, model, using=using)
