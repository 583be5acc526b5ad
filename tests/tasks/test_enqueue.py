"""singleton_on_enqueue="drop": a key queued or running is not enqueued again; claims go
stale with the run's lease or after singleton_queued_for, and go when revoked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster_singletons.conf import get_settings
from cluster_singletons.models import TaskClaim
from cluster_singletons.tasks import claims, enqueue
from cluster_singletons.tasks import holder as holders
from cluster_singletons.tasks.holder import Holder
from project.celery import app
from project.demo.tasks import exclusive_drop, exclusive_skip

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def no_messages_left() -> Iterator[None]:
    """Nothing this module publishes stays in the broker for a later test's worker."""
    yield
    app.control.purge()
    holders.reset()


def _args(tmp_path: Path, key: str = "k") -> tuple[str, float, str]:
    return (key, 0.0, str(tmp_path / "events"))


def test_a_duplicate_of_a_queued_run_is_not_enqueued_and_gets_its_id(tmp_path: Path) -> None:
    first = exclusive_drop.delay(*_args(tmp_path))
    again = exclusive_drop.apply_async(args=_args(tmp_path))
    assert again.id == first.id
    other = exclusive_drop.delay(*_args(tmp_path, "other"))
    assert other.id != first.id
    assert TaskClaim.objects.count() == 2


def test_enqueue_anyway_is_the_default_and_claims_nothing(tmp_path: Path) -> None:
    assert exclusive_skip.delay(*_args(tmp_path)).id != exclusive_skip.delay(*_args(tmp_path)).id
    assert not TaskClaim.objects.exists()


def test_a_claim_queued_longer_than_queued_for_is_taken_over(tmp_path: Path) -> None:
    first = exclusive_drop.delay(*_args(tmp_path))
    exclusive_drop.singleton_queued_for = 0.0
    try:
        second = exclusive_drop.delay(*_args(tmp_path))
    finally:
        exclusive_drop.singleton_queued_for = 3600.0
    assert second.id != first.id
    assert list(TaskClaim.objects.values_list("task_id", flat=True)) == [second.id]


def test_a_running_claim_lives_with_its_runs_lease_only(tmp_path: Path) -> None:
    first = exclusive_drop.delay(*_args(tmp_path))
    key = exclusive_drop.singleton_key_of(_args(tmp_path), {})
    holder = Holder(get_settings())
    try:
        lock = holder.acquire(key, task_id=first.id)
        assert lock is not None
        enqueue.running(lock)
        assert exclusive_drop.delay(*_args(tmp_path)).id == first.id, "running: dropped"
        holder.release(lock)  # as a killed run's lease would expire: the claim is stale
        assert exclusive_drop.delay(*_args(tmp_path)).id != first.id
    finally:
        holder.close()


def test_a_run_finishes_its_claim_and_the_next_enqueue_is_a_new_run(tmp_path: Path) -> None:
    app.conf.task_always_eager = True
    try:
        ran = exclusive_drop.delay(*_args(tmp_path))
        assert ran.state == "SUCCESS"
        assert not TaskClaim.objects.exists()
        assert exclusive_drop.delay(*_args(tmp_path)).id != ran.id
    finally:
        app.conf.task_always_eager = False


def test_a_revoked_run_leaves_no_claim(tmp_path: Path) -> None:
    queued = exclusive_drop.delay(*_args(tmp_path))
    request = SimpleNamespace(task=exclusive_drop, id=queued.id)
    enqueue.on_revoked(request=request)
    assert (
        claims.holding(exclusive_drop.singleton_key_of(_args(tmp_path), {}).lease, using="default")
        is None
    )
    assert exclusive_drop.delay(*_args(tmp_path)).id != queued.id


def test_a_skipped_run_leaves_no_claim(tmp_path: Path) -> None:
    holder = Holder(get_settings())
    lock = holder.acquire(exclusive_drop.singleton_key_of(_args(tmp_path), {}), task_id="x")
    assert lock is not None
    app.conf.task_always_eager = True
    try:
        assert exclusive_drop.delay(*_args(tmp_path)).state == "IGNORED"
    finally:
        app.conf.task_always_eager = False
        holder.release(lock)
        holder.close()
    assert not TaskClaim.objects.exists()
