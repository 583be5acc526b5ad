"""What the ledger says of the ticks around a leader's kill, for ``benchmarks.failover
--schedules`` (definitions in ``benchmarks._beat_failover``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import F

from benchmarks.beat import Layout, pct

ONE_S = timedelta(seconds=1)


def measure(t_kill: float, window: int, layout: Layout) -> dict[str, Any]:
    """Lateness of the ticks due in [t_kill, t_kill + window), and when publication after
    the kill was first on time and last late."""
    from cluster_singletons.models import Run

    w0, w1 = (datetime.fromtimestamp(t, UTC) for t in (t_kill, t_kill + window))
    after = Run.objects.filter(kind=Run.Kind.SCHEDULED, published_at__gte=w0)
    by_time = after.order_by("published_at").values_list("published_at", flat=True)
    late_after = after.filter(published_at__gt=F("tick") + ONE_S)

    def since_kill(at: datetime | None) -> float | None:
        return None if at is None else round(at.timestamp() - t_kill, 3)

    scheduled = Run.objects.filter(kind=Run.Kind.SCHEDULED)

    rows = list(
        scheduled.filter(tick__gte=w0, tick__lt=w1).values_list(
            "tick", "published_at", "status", "ticks", "epoch"
        )
    )
    ms: list[float] = []
    late = unpublished = skipped = 0
    worst: dict[int, float] = {}
    for tick, published, status, _, _ in rows:
        if status == Run.Status.SKIPPED:
            skipped += 1
        elif published is None:
            unpublished += 1
        else:
            lat = (published - tick).total_seconds() * 1000
            ms.append(lat)
            late += lat > 1000
            sec = int(tick.timestamp() - t_kill)
            worst[sec] = max(worst.get(sec, 0.0), lat)
    due = layout.expected(w0.timestamp(), w1.timestamp())
    epochs: dict[str, int] = {}
    for *_, epoch in rows:
        epochs[str(epoch)] = epochs.get(str(epoch), 0) + 1
    return {
        "first_publish_s": since_kill(by_time.first()),
        "first_on_time_s": since_kill(by_time.filter(published_at__lte=F("tick") + ONE_S).first()),
        "recovered_s": since_kill(
            late_after.order_by("-published_at").values_list("published_at", flat=True).first()
        )
        or 0.0,
        "late_published_after_kill": late_after.count(),
        "due_in_window": due,
        "rows_in_window": len(rows),
        "missing": due - sum(r[3] for r in rows),
        "late_over_1s": late + unpublished,
        "unpublished": unpublished,
        "skipped": skipped,
        "lateness_ms": {
            "p50": _r(pct(ms, 0.5)),
            "p99": _r(pct(ms, 0.99)),
            "max": _r(max(ms, default=None)),
        },
        "max_ms_by_second_since_kill": [_r(worst.get(s)) for s in range(window)],
        "rows_by_epoch": epochs,
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)
