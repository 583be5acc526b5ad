"""The store of django-celery-beat's tables: rows, the change signature, run bookkeeping."""

from __future__ import annotations

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons.beat import periodic_tasks

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]

USING = "default"


def _task(name: str, every: int = 10) -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
    return PeriodicTask.objects.create(name=name, task="project.demo.tasks.ping", interval=interval)


def test_rows_read_every_field_the_sources_need_in_order() -> None:
    _task("a", every=7)
    (row,), unreadable = periodic_tasks.rows(using=USING)
    assert unreadable == {}
    fields = dict(zip(periodic_tasks.FIELDS, row, strict=True))
    assert (fields["name"], fields["interval__every"], fields["interval__period"]) == (
        "a",
        7,
        "seconds",
    )


def test_the_signature_changes_when_a_task_is_added_or_edited_through_save() -> None:
    before = periodic_tasks.signature(USING)
    task = _task("a")
    added = periodic_tasks.signature(USING)
    assert added != before
    task.args = "[1]"
    task.save()
    assert periodic_tasks.signature(USING) != added


def test_the_signature_ignores_run_bookkeeping() -> None:
    task = _task("a")
    before = periodic_tasks.signature(USING)
    periodic_tasks.record_runs(["a"], one_off=[], at=timezone.now(), using=USING)
    task.refresh_from_db()
    assert task.total_run_count == 1 and task.last_run_at is not None
    assert periodic_tasks.signature(USING) == before, "recording a run looked like an edit"


def test_recording_runs_counts_them_and_disables_one_off_tasks() -> None:
    _task("repeat")
    once = _task("once")
    once.one_off = True
    once.save()
    at = timezone.now()
    periodic_tasks.record_runs(["repeat", "once"], one_off=["once"], at=at, using=USING)
    rows = {t.name: t for t in PeriodicTask.objects.all()}
    assert (rows["repeat"].total_run_count, rows["repeat"].enabled) == (1, True)
    assert (rows["once"].total_run_count, rows["once"].enabled) == (1, False)
    assert rows["repeat"].last_run_at == at
