"""SingletonTask in one process against the real database: the key is taken before the
body, released however it ends, refused when it cannot be made, and fenced while held."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import shared_task
from prometheus_client import REGISTRY

from cluster_singletons.conf import get_settings
from cluster_singletons.errors import NoClusterLock, TaskKeyHeld, TaskKeyInvalid
from cluster_singletons.models import Lease, Runner
from cluster_singletons.tasks import holder as holders
from cluster_singletons.tasks.holder import Holder
from cluster_singletons.tasks.task import SingletonTask
from project.demo.models import FencedWrite
from project.demo.tasks import exclusive_skip, exclusive_wait

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@shared_task(name="tests.seen_lock", base=SingletonTask, bind=True, singleton_key=("n",))
def seen_lock(self: Any, n: int, fail: bool = False) -> dict[str, Any]:
    lock = self.cluster_lock
    with lock.fenced():
        FencedWrite.objects.create(
            lease=lock.lease, runner_id=lock.term.runner_id, epoch=lock.epoch
        )
    held = Lease.objects.get(name=lock.lease)
    if fail:
        raise RuntimeError("the body failed")
    return {"lease": lock.lease, "epoch": lock.epoch, "holder": held.holder_id}


@shared_task(name="tests.bad_key", base=SingletonTask, singleton_key=lambda *a, **k: 1 / 0)
def bad_key(n: int) -> None:
    raise AssertionError("the body must not run without a key")


@pytest.fixture(autouse=True)
def holders_closed() -> Iterator[list[Holder]]:
    """This process's holder and the others a test makes are closed after it, so no
    thread of theirs keeps a session on the test database."""
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.close()
    holders.reset()


@pytest.fixture
def other(holders_closed: list[Holder]) -> Holder:
    """A second holder of task keys in this process: another run, as far as keys go."""
    holder = Holder(get_settings())
    holders_closed.append(holder)
    return holder


def _free(lease: str) -> bool:
    return Lease.objects.filter(name=lease, holder__isnull=True).exists()


def test_the_body_runs_holding_its_key_fenced_and_the_key_is_free_after() -> None:
    result = seen_lock.apply(args=(1,)).get()
    runner = Runner.objects.get(pk=result["holder"])
    assert runner.kind == Runner.Kind.TASK
    assert result["lease"].startswith("task:tests.seen_lock:")
    assert FencedWrite.objects.filter(epoch=result["epoch"]).count() == 1
    assert _free(result["lease"])
    again = seen_lock.apply(args=(1,)).get()
    assert again["epoch"] == result["epoch"] + 1, "each run is a new term"


def test_a_body_that_raises_releases_its_key() -> None:
    outcome = seen_lock.apply(args=(2,), kwargs={"fail": True})
    assert outcome.state == "FAILURE"
    assert Lease.objects.filter(name__startswith="task:tests.seen_lock:").count() == 1
    assert _free(Lease.objects.get(name__startswith="task:tests.seen_lock:").name)


def test_a_key_function_that_raises_fails_the_task_naming_it_and_leaves_no_lease() -> None:
    outcome = bad_key.apply(args=(1,))
    assert outcome.state == "FAILURE"
    assert isinstance(outcome.result, TaskKeyInvalid)
    assert "singleton task 'tests.bad_key'" in str(outcome.result)
    assert not Lease.objects.filter(name__contains="tests.bad_key").exists()


def test_cluster_lock_outside_a_run_is_a_clear_error() -> None:
    with pytest.raises(NoClusterLock, match=r"tests\.seen_lock"):
        _ = seen_lock.cluster_lock


def test_a_held_key_skips_the_run_and_the_body_never_starts(tmp_path: Path, other: Holder) -> None:
    events = tmp_path / "events"
    key = exclusive_skip.singleton_key_of(("k", 0.0, str(events)), {})
    lock = other.acquire(key, task_id="elsewhere")
    assert lock is not None
    outcome = exclusive_skip.apply(args=("k", 0.0, str(events)))
    assert outcome.state == "IGNORED"
    assert not events.exists()
    other.release(lock)
    assert exclusive_skip.apply(args=("k", 0.0, str(events))).state == "SUCCESS"
    assert events.read_text().count("start") == 1


def test_wait_runs_once_the_key_is_released_and_gives_up_after_its_bound(
    tmp_path: Path, other: Holder
) -> None:
    events = tmp_path / "events"
    args = ("k", 0.0, str(events))
    key = exclusive_wait.singleton_key_of(args, {})
    lock = other.acquire(key, task_id="elsewhere")
    assert lock is not None
    threading.Timer(0.5, other.release, args=(lock,)).start()
    started = time.monotonic()
    assert exclusive_wait.apply(args=args).state == "SUCCESS"
    assert time.monotonic() - started >= 0.5
    lock = other.acquire(key, task_id="elsewhere")
    assert lock is not None
    exclusive_wait.singleton_wait = 0.3
    try:
        outcome = exclusive_wait.apply(args=args)
    finally:
        exclusive_wait.singleton_wait = 60.0
        other.release(lock)
    assert outcome.state == "FAILURE" and isinstance(outcome.result, TaskKeyHeld)
    assert events.read_text().count("start") == 1


def test_renewal_keeps_a_held_key_and_reports_a_lost_one(other: Holder) -> None:
    holder = other
    key = seen_lock.singleton_key_of((9,), {})
    lock = holder.acquire(key, task_id="t")
    assert lock is not None
    before = Lease.objects.get(name=key.lease).expires_at
    time.sleep(0.01)
    holder.renew()
    assert Lease.objects.get(name=key.lease).expires_at > before
    assert lock.held and not lock.lost
    Lease.objects.filter(name=key.lease).update(holder=None)  # an operator freed it
    holder.renew()
    assert lock.lost and not lock.held
    holder.release(lock)


def test_the_process_holder_is_new_after_a_fork() -> None:
    first = holders.current()
    assert holders.current() is first
    first.pid = -1  # as a child sees its parent's holder
    assert holders.current() is not first


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_acquired_skipped_lost_and_hold_duration(
    tmp_path: Path, other: Holder
) -> None:
    task = "demo.exclusive_skip"
    before = {
        "acquired": _sample("cluster_task_keys_acquired_total", task=task),
        "skipped": _sample("cluster_task_keys_skipped_total", task=task, policy="skip"),
        "lost": _sample("cluster_task_keys_lost_total", task=task),
        "held": _sample("cluster_task_key_hold_duration_seconds_count", task=task),
    }
    args = ("m", 0.0, str(tmp_path / "events"))
    exclusive_skip.apply(args=args)
    lock = other.acquire(exclusive_skip.singleton_key_of(args, {}), task_id="t")
    assert lock is not None
    exclusive_skip.apply(args=args)
    Lease.objects.filter(name=lock.lease).update(holder=None)
    other.renew()
    other.release(lock)
    assert _sample("cluster_task_keys_acquired_total", task=task) == before["acquired"] + 2
    skipped = _sample("cluster_task_keys_skipped_total", task=task, policy="skip")
    assert skipped == before["skipped"] + 1
    assert _sample("cluster_task_keys_lost_total", task=task) == before["lost"] + 1
    held = _sample("cluster_task_key_hold_duration_seconds_count", task=task)
    assert held == before["held"] + 2


def test_a_skipped_run_shows_the_skipped_state_in_the_result_backend(
    tmp_path: Path, other: Holder
) -> None:
    from celery.backends.cache import CacheBackend

    args = ("shown", 0.0, str(tmp_path / "events"))
    lock = other.acquire(exclusive_skip.singleton_key_of(args, {}), task_id="t")
    assert lock is not None
    backend = CacheBackend(app=exclusive_skip.app, backend="memory", url="memory://")
    saved = exclusive_skip.backend
    exclusive_skip.backend = backend
    try:
        outcome = exclusive_skip.apply(args=args)
    finally:
        exclusive_skip.backend = saved
        other.release(lock)
    meta = backend.get_task_meta(outcome.id)
    assert meta["status"] == "SKIPPED"
    assert meta["result"] == {"key": lock.key.value, "lease": lock.lease}
