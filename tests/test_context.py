"""The cluster context: scoping, isolation across threads and tasks, logs, Celery headers."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from cluster_singletons import context, task_signals
from cluster_singletons.errors import ClusterContextRequired

pytestmark = pytest.mark.unit


def test_current_outside_any_context_raises_a_lookup_error_saying_where_to_call_it() -> None:
    with pytest.raises(ClusterContextRequired, match="inside a singleton") as caught:
        context.current()
    assert isinstance(caught.value, LookupError)


def test_within_cluster_scopes_and_nests() -> None:
    with context.within_cluster(runner=1, singleton="a", epoch=3, is_leader=True):
        with context.within_cluster(tick="2026-01-01T00:00:00Z") as inner:
            assert (inner.singleton, inner.epoch, inner.tick) == ("a", 3, "2026-01-01T00:00:00Z")
        assert context.current().tick is None
    assert context.get() is None


def test_threads_do_not_see_each_others_context() -> None:
    seen: dict[str, str | None] = {}
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        with context.within_cluster(singleton=name):
            barrier.wait()
            seen[name] = context.current().singleton

    threads = [threading.Thread(target=work, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"x": "x", "y": "y"}


def test_asyncio_tasks_inherit_and_isolate_the_context() -> None:
    async def child(name: str) -> str | None:
        with context.within_cluster(schedule=name):
            await asyncio.sleep(0)
            return f"{context.current().singleton}/{context.current().schedule}"

    async def main() -> list[str | None]:
        with context.within_cluster(singleton="parent"):
            return list(await asyncio.gather(child("a"), child("b")))

    assert asyncio.run(main()) == ["parent/a", "parent/b"]


def test_logging_filter_adds_the_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    log_filter = context.ClusterContextFilter()
    with context.within_cluster(runner=7, singleton="s", epoch=2, is_leader=True):
        assert log_filter.filter(record)
    assert (record.cluster_runner, record.cluster_singleton, record.cluster_epoch) == (7, "s", 2)
    log_filter.filter(record)
    assert record.cluster_singleton is None


def test_publish_adds_the_header_and_prerun_restores_it() -> None:
    headers: dict[str, object] = {}
    with context.within_cluster(runner=1, singleton="s", epoch=4, is_leader=True):
        task_signals._on_publish(headers=headers)
    assert headers[context.HEADER] == {"runner": 1, "singleton": "s", "epoch": 4, "is_leader": True}

    class Request:
        cluster_context = headers[context.HEADER]

    class Task:
        request = Request()

    task_signals._on_prerun(task_id="t1", task=Task())
    assert context.current().singleton == "s"
    task_signals._on_postrun(task_id="t1")
    assert context.get() is None
