from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from celery import shared_task

from cluster_singletons import context
from cluster_singletons.errors import LeadershipLost
from cluster_singletons.tasks.task import SingletonTask

logger = logging.getLogger(__name__)


@shared_task(name="demo.ping")
def ping(note: str = "") -> str:
    ctx = context.get()
    logger.info("ping %s context=%s", note, json.dumps(ctx.as_header() if ctx else None))
    return note


# -- singleton tasks the worker tests run (tests/tasks) ------------------------------------


def _record(events: str, what: str, task_id: str | None) -> None:
    """One line per event, appended in one write: the file's order is the kernel's."""
    with open(events, "a") as out:
        out.write(f"{what} {task_id} {os.getpid()} {time.time():.6f}\n")


def _exclusive(self: Any, key: str, hold: float, events: str) -> None:
    _record(events, "start", self.request.id)
    time.sleep(hold)
    _record(events, "end", self.request.id)


_ONE_KEY = {"base": SingletonTask, "bind": True, "singleton_key": ("key",), "max_retries": None}
exclusive_skip = shared_task(name="demo.exclusive_skip", **_ONE_KEY)(_exclusive)
exclusive_retry = shared_task(
    name="demo.exclusive_retry",
    singleton_on_held="retry",
    singleton_retry_countdown=0.05,
    **_ONE_KEY,
)(_exclusive)
exclusive_wait = shared_task(
    name="demo.exclusive_wait", singleton_on_held="wait", singleton_wait=60.0, **_ONE_KEY
)(_exclusive)
exclusive_drop = shared_task(name="demo.exclusive_drop", singleton_on_enqueue="drop", **_ONE_KEY)(
    _exclusive
)


@shared_task(name="demo.fenced_write", **_ONE_KEY)
def fenced_write(self: Any, key: str, events: str, gate: str) -> None:
    """Waits for ``gate`` to exist, then writes one row fenced by its key."""
    from project.demo.models import FencedWrite

    _record(events, "start", self.request.id)
    while not os.path.exists(gate):
        time.sleep(0.01)
    lock = self.cluster_lock
    try:
        with lock.fenced():
            FencedWrite.objects.create(
                lease=lock.lease, runner_id=lock.term.runner_id, epoch=lock.epoch
            )
    except LeadershipLost:
        _record(events, "refused", self.request.id)
        raise
    _record(events, "wrote", self.request.id)
