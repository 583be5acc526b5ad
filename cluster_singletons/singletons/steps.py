"""The step store: results of a singleton's resumable steps (``ctx.step(name, fn)``).

Statements and their invariants:

- ``(singleton, run_key, name)`` is unique: a step has one recorded result, whoever
  leads.
- ``recorded``: the stored JSON result of a step, or None (a read).
- ``record``: inserts the result in one statement fenced on the leader's term
  (``fencing.fence_clause``; ``recorded_at`` takes the database's clock). A deposed
  leader's insert writes nothing and raises ``LeadershipLost``; an insert that meets a
  result already recorded writes nothing and returns False: the recorded one stands.
"""

from __future__ import annotations

import functools

from django.db import connections

from cluster_singletons.cluster import fencing
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.models import StepRecord

_COLUMNS = ("singleton", "run_key", "name", "result", "epoch")


def recorded(singleton: str, run_key: str, name: str, *, using: str) -> str | None:
    """The recorded JSON result of this step, if any."""
    rows = StepRecord.objects.using(using).filter(singleton=singleton, run_key=run_key, name=name)
    return rows.values_list("result", flat=True).first()


def record(
    singleton: str, run_key: str, name: str, result: str, *, term: Term, ttl: float, using: str
) -> bool:
    """Record ``result`` (JSON) for this step within ``term``; False if a result was
    already recorded. Raises ``LeadershipLost`` when the term is over."""
    params: list[str | int] = [singleton, run_key, name, result, term.epoch]
    params += fencing.fence_params(term)
    with (
        fencing.statement_fence(term, using=using, ttl=ttl),
        connections[using].cursor() as cursor,
    ):
        cursor.execute(_insert_sql(using), params)
        written = cursor.rowcount
    if written == 1:
        return True
    fencing.ensure_held(term, using=using)
    return False


@functools.cache
def _insert_sql(using: str) -> str:
    """Built once per database alias."""
    return fencing.insert_sql(connections[using], StepRecord, _COLUMNS, fenced=True)
