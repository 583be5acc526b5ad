"""The example project's singletons: a batch indexer and a rate aggregator.

``CLUSTER_DEMO_SINGLETONS`` (comma-separated groups, default ``demo``) picks what this
process declares; the tests use the probe groups of ``project.demo.probes``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from cluster_singletons import SingletonContext, singleton
from project.demo.models import Document, FencedWrite
from project.demo.tasks import ping

BATCH = 50


def _indexer_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 stored only ``last_id``; version 2 names it ``cursor`` and counts rows."""
    return {"cursor": data.get("last_id", 0), "processed": data.get("last_id", 0)}


class IndexerState(BaseModel):
    schema_version: ClassVar[int] = 2
    upgrades: ClassVar[dict[int, Any]] = {1: _indexer_v1_to_v2}

    cursor: int = 0
    processed: int = 0


GROUPS = set(os.environ.get("CLUSTER_DEMO_SINGLETONS", "demo").split(","))


def indexer(ctx: SingletonContext[IndexerState]) -> None:
    """Walk ``Document`` in id order, BATCH rows at a time, checkpointing the cursor."""
    ctx.step("seed", _seed_documents)
    while ctx.running:
        state = ctx.state
        ids = list(
            Document.objects.filter(id__gt=state.cursor)
            .order_by("id")
            .values_list("id", flat=True)[:BATCH]
        )
        if not ids:
            return  # caught up: called again after `interval`
        Document.objects.filter(id__in=ids).update(indexed=True)  # idempotent if redone
        ctx.save(IndexerState(cursor=ids[-1], processed=state.processed + len(ids)))
        ctx.heartbeat()
        ctx.sleep(float(os.environ.get("CLUSTER_DEMO_BATCH_PAUSE", "0.1")))


def _seed_documents() -> int:
    Document.objects.bulk_create(Document(title=f"document {i}") for i in range(1, 501))
    return 500


class RateState(BaseModel):
    last_seen_id: int = 0
    per_minute: dict[str, int] = Field(default_factory=dict)


def rates(ctx: SingletonContext[RateState]) -> None:
    """Count fenced writes per minute (keeping the last hour) and report through a task."""

    def add_new(state: RateState) -> RateState:
        rows = FencedWrite.objects.filter(id__gt=state.last_seen_id).values_list("id", "written_at")
        counts = dict(state.per_minute)
        last = state.last_seen_id
        for row_id, written_at in rows.iterator():
            minute = written_at.strftime("%Y-%m-%dT%H:%M")
            counts[minute] = counts.get(minute, 0) + 1
            last = max(last, row_id)
        kept = dict(sorted(counts.items())[-60:])
        return RateState(last_seen_id=last, per_minute=kept)

    state = ctx.modify(add_new)
    ping.delay(f"rates total={sum(state.per_minute.values())}")


if "demo" in GROUPS:
    singleton("indexer", state=IndexerState, interval=1.0)(indexer)
    singleton("rates", state=RateState, interval=5.0)(rates)
if GROUPS - {"demo"}:
    from project.demo import probes

    probes.declare(GROUPS)
