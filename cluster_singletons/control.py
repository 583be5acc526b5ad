"""Operator actions: on schedules (find, preview, run now, pause/resume, backfill, prune)
and on singletons (show, reset, edit or import state, hand off leadership).

These write what the leading beat acts on (ledger intents, pause flags) and never talk
to the broker themselves: a manual or backfilled run is a ``pending`` ledger row that the
leader publishes within about a second, exactly once.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import current_app
from pydantic import BaseModel

from cluster_singletons import names
from cluster_singletons.beat import ledger, schedule_records
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.sources import load_all
from cluster_singletons.beat.timetables import Cron, Timetable, preview, zone
from cluster_singletons.cluster import leases
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import ScheduleInvalid, StateImportRefused, UnknownSchedule
from cluster_singletons.models import Run, StateRecord
from cluster_singletons.singletons import registry, state_versions
from cluster_singletons.singletons.state import StateStore

#: A backfill larger than this is refused: split the range.
MAX_BACKFILL = 10_000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def schedules() -> dict[str, Schedule]:
    return load_all(current_app, using=get_settings().database)


def find(name: str) -> Schedule:
    """The schedule keyed ``name`` (``periodic:x``) or, unambiguously, named ``name``."""
    found = schedules()
    if name in found:
        return found[name]
    matches = [s for s in found.values() if s.name == name]
    if len(matches) != 1:
        raise UnknownSchedule(name, sorted(found))
    return matches[0]


def timetable_of(spec: str, tz: str | None = None) -> tuple[str, Timetable]:
    """A cron expression (five fields) or a schedule name -> (label, timetable)."""
    if len(spec.split()) == 5:
        return spec, Cron(spec, zone(tz))
    schedule = find(spec)
    if schedule.timetable is None:
        raise ScheduleInvalid(f"{schedule.key}: {schedule.problem}")
    return schedule.key, schedule.timetable


def upcoming(spec: str, count: int, *, tz: str | None = None) -> list[datetime]:
    """The next ``count`` run times of a cron expression or schedule, from now."""
    return preview(timetable_of(spec, tz)[1], count, after=datetime.now(UTC))


def run_now(name: str, *, note: str = "") -> Run:
    """Record a manual run of schedule ``name``; the leader publishes it."""
    schedule = _dispatchable(name)
    intent = ledger.Intent.run_of(
        schedule, datetime.now(UTC), kind=Run.Kind.MANUAL, reason=note or "run now"
    )
    (row,) = _record([intent])
    return row


def pause(name: str, note: str) -> None:
    """Stop dispatching ``name`` (its ticks pass without runs) until ``resume``."""
    set_paused(find(name).key, note)


def resume(name: str) -> None:
    set_paused(find(name).key, None)


def set_paused(key: str, note: str | None) -> None:
    """Pause schedule ``key`` with ``note`` saying why, or resume it (``None``)."""
    schedule_records.set_paused(key, note, using=get_settings().database)


def backfill(name: str, start: datetime, end: datetime) -> tuple[int, int]:
    """Dispatch the ticks of ``name`` in [start, end] that never ran, once each.

    A tick already in the ledger, or inside a run that coalesced it, is left out; ticks
    that were skipped are backfilled. Returns (recorded, left out)."""
    if end < start:
        raise ValueError("--end is before --start")
    schedule = _dispatchable(name)
    assert schedule.timetable is not None
    ticks = []
    cursor = start - timedelta(microseconds=1)
    try:
        while (tick := schedule.timetable.next_after(cursor)) is not None and tick <= end:
            ticks.append(tick)
            if len(ticks) > MAX_BACKFILL:
                raise ValueError(f"more than {MAX_BACKFILL} ticks in that range; split it")
            cursor = tick
    except OverflowError as exc:
        raise ValueError(
            f"the ticks of {schedule.key} after {cursor.isoformat()} are past the calendar's end"
        ) from exc
    ran = ledger.covered(schedule.key, start, end, using=get_settings().database)
    todo = [t for t in ticks if not any(a <= t <= b for a, b in ran)]
    reason = f"backfill {start.isoformat()} .. {end.isoformat()}"
    intents = [
        ledger.Intent.run_of(schedule, tick, kind=Run.Kind.BACKFILL, reason=reason) for tick in todo
    ]
    recorded = _record(intents) if intents else []
    taken = {r.tick for r in recorded}
    revived = ledger.revive_skipped(
        [i for i in intents if i.tick not in taken], using=get_settings().database
    )
    done = len(recorded) + revived
    return done, len(ticks) - done


def prune(older_than: float) -> int:
    """Delete ledger rows older than ``older_than`` seconds (intents not yet published stay)."""
    try:
        before = datetime.now(UTC) - timedelta(seconds=older_than)
    except OverflowError as exc:
        days = (datetime.now(UTC) - datetime.min.replace(tzinfo=UTC)).days
        raise ValueError(
            f"{older_than / 86400:.0f} days is more than the calendar holds ({days:,} days back)"
        ) from exc
    return ledger.prune(before=before, using=get_settings().database)


def parse_duration(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"3600s"``, ``"2w"`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m, 3600s or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _dispatchable(name: str) -> Schedule:
    schedule = find(name)
    if schedule.problem:
        raise ScheduleInvalid(f"{schedule.key} cannot run: {schedule.problem}")
    return schedule


def _record(intents: list[ledger.Intent]) -> list[Run]:
    settings = get_settings()
    return ledger.record(
        intents, last_ticks={}, term=None, using=settings.database, ttl=settings.lease_ttl
    )


# -- singletons --------------------------------------------------------------------------


def singleton_store(name: str) -> StateStore[Any]:
    """The unfenced state store of singleton ``name`` (``UnknownSingleton`` if undeclared)."""
    spec = registry.get(name)
    return StateStore(spec.lease, spec.state, owner=spec.name)


def state_row(name: str) -> StateRecord | None:
    return singleton_store(name).row()


def reset_state(name: str, note: str = "") -> None:
    """Delete singleton ``name``'s state (kept in history); its next load gives defaults."""
    singleton_store(name).reset(note or "reset by an operator")


def decode_state(name: str, text: str, *, schema_version: int | None = None) -> BaseModel:
    """The JSON ``text`` as singleton ``name``'s model: an export (schema version inside,
    decoded through the upgrades) or a bare value at ``schema_version`` (None: the model's).
    ``StateImportRefused`` for invalid JSON, a newer version, an unknown field, a failed
    upgrade or a value the model rejects."""
    model = singleton_store(name).model
    try:
        return state_versions.decode_import(model, text, schema_version)
    except state_versions.DecodeError as exc:
        raise StateImportRefused(name, str(exc)) from exc


def export_state(name: str) -> str:
    """Singleton ``name``'s state as ``{"schema_version": n, "value": ...}`` (the stored
    value as stored, or the model's defaults when nothing is stored)."""
    store = singleton_store(name)
    row = store.row()
    if row is None:
        return state_versions.exported(
            store.model().model_dump_json(), state_versions.version_of(store.model)
        )
    try:
        return state_versions.exported(row.value, row.schema_version)
    except state_versions.DecodeError as exc:
        raise StateImportRefused(name, f"cannot export: {exc}") from exc


def import_state(
    name: str, text: str, note: str = "", *, schema_version: int | None = None
) -> BaseModel:
    """Replace singleton ``name``'s state with the JSON ``text`` (see ``decode_state``),
    stored at the model's schema version; refused (``StateImportRefused``) before anything
    is written."""
    value = decode_state(name, text, schema_version=schema_version)
    singleton_store(name).edit(value, note or "edited by an operator")
    return value


def handoff(name: str) -> bool:
    """Ask the leader of ``name`` (a singleton, or ``beat``) to hand off; False if none leads."""
    lease = name if name == names.BEAT else registry.get(name).lease
    settings = get_settings()
    stored = names.prefixed(lease, settings.key_prefix)
    return leases.request_handoff(stored, using=settings.database)
