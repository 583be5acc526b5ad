"""The leader's schedules in memory: one live heap item per schedule, schedules judged
alone, and what their records should say (pure: no database, no clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cluster_singletons.beat.catalog import DELETED, Catalog
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.timetables import Every

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)


def _every(key: str, seconds: float = 10, **fields: Any) -> Schedule:
    return Schedule(key=key, source="beat", timetable=Every(seconds), task="t", **fields)


def _none(keys: list[str]) -> dict[str, datetime | None]:
    return {}


def test_edits_leave_one_live_item_and_a_pop_never_returns_a_schedule_twice() -> None:
    catalog = Catalog()
    catalog.apply({"beat:a": _every("beat:a")}, T0, _none)
    for n in range(5):  # five edits that keep the same next tick
        catalog.apply({"beat:a": _every("beat:a", args=(n,))}, T0, _none)
        assert catalog.live_items("beat:a") == 1
    due = catalog.pop_due(
        T0 + timedelta(seconds=10), T0 + timedelta(seconds=11), limit=100, ahead_limit=100
    )
    assert [e.schedule.key for e in due] == ["beat:a"]
    assert catalog.live_items("beat:a") == 0, "popped: queued again only when planned"


def test_new_schedules_start_from_the_ledger_and_edits_from_now() -> None:
    catalog = Catalog()
    recorded = {"beat:a": T0 - timedelta(seconds=25)}
    catalog.apply({"beat:a": _every("beat:a")}, T0, lambda keys: recorded)
    assert catalog.entries["beat:a"].due == T0 - timedelta(seconds=20), "catches up"
    catalog.apply({"beat:a": _every("beat:a", args=(1,))}, T0, lambda keys: recorded)
    assert catalog.entries["beat:a"].due == T0 + timedelta(seconds=10), "an edit: from now"


class _Broken:
    def next_after(self, after: datetime) -> datetime | None:
        raise ValueError("no next tick")

    def describe(self) -> str:
        return "broken"


def test_a_schedule_whose_next_tick_fails_is_flagged_alone_once() -> None:
    catalog = Catalog()
    bad = Schedule(key="beat:bad", source="beat", timetable=_Broken(), task="t")  # type: ignore[arg-type]
    changes = catalog.apply({"beat:bad": bad, "beat:ok": _every("beat:ok")}, T0, _none)
    assert [s.key for s in changes.flagged] == ["beat:bad"]
    assert "no next tick" in catalog.schedules["beat:bad"].problem
    assert catalog.live_items("beat:bad") == 0 and catalog.live_items("beat:ok") == 1
    again = catalog.apply({"beat:bad": bad, "beat:ok": _every("beat:ok")}, T0, _none)
    assert again.flagged == [], "the same problem is not flagged twice"


def test_a_fixed_schedule_is_reported_fixed_and_a_removed_one_deleted() -> None:
    catalog = Catalog()
    broken = replace(_every("beat:a"), timetable=None, problem="bad")
    catalog.apply({"beat:a": broken, "beat:b": _every("beat:b")}, T0, _none)
    changes = catalog.apply({"beat:a": _every("beat:a")}, T0, _none)
    assert changes.fixed == ["beat:a"] and changes.deleted == ["beat:b"]


def test_notes_clear_fixed_problems_mark_gone_schedules_and_skip_what_is_already_said() -> None:
    catalog = Catalog()
    catalog.apply({"beat:a": _every("beat:a")}, T0, _none)
    changes = catalog.apply({"beat:a": _every("beat:a")}, T0, _none)
    stored = {"beat:a": "was bad", "beat:gone": "was bad too", "beat:old": DELETED}
    notes = catalog.notes(changes, stored, recorded=["beat:a", "beat:quiet", "beat:old"])
    assert notes == {"beat:a": "", "beat:gone": DELETED, "beat:quiet": DELETED}
