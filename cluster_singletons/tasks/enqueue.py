"""The enqueue-time policy of singleton tasks: ``singleton_on_enqueue``.

- ``"enqueue"`` (the default): every ``delay``/``apply_async`` publishes; the run-time key
  decides what runs.
- ``"drop"``: while a run of the same key is queued or running, ``apply_async`` publishes
  nothing and returns that run's ``AsyncResult``. A queued claim counts for
  ``singleton_queued_for`` seconds at most (a message lost by the broker blocks its key no
  longer); a running one for as long as its run holds the key, so a killed worker's claim
  ends with its lease. A revoked run's claim is deleted when its worker discards it.

Only ``apply_async`` (and so ``delay``, retries, the beat when it calls it) consults the
claims; ``send_task`` publishes regardless, and is still stopped at run time.
Claims are hints: a database error while marking or finishing one is logged, never fatal
to the run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cluster_singletons import metrics
from cluster_singletons._connection import DATABASE_ERRORS, drop_if_unusable
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import describe

if TYPE_CHECKING:
    from cluster_singletons.tasks.lock import ClusterLock

#: A ``SingletonTask`` (this module is below ``task``, which imports it).
SingletonTask = Any

logger = logging.getLogger("cluster_singletons.tasks")

ON_ENQUEUE = ("enqueue", "drop")


def claim(task: SingletonTask, args: Any, kwargs: Any, task_id: str) -> str:
    """Claim the call's key for ``task_id``; the task id the claim belongs to (another
    one: a duplicate, to be dropped)."""
    from cluster_singletons.tasks import claims

    key = task.singleton_key_of(tuple(args or ()), dict(kwargs or {}))
    holder = claims.claim(
        key.lease,
        task=task.name,
        task_id=task_id,
        queued_for=task.singleton_queued_for,
        using=get_settings().database,
    )
    if holder != task_id:
        metrics.TASK_KEYS_SKIPPED.labels(task.name, "drop").inc()
        logger.info(
            "task %s: key %s is queued or running as %s; not enqueued again",
            task.name,
            key.value,
            holder,
        )
    return holder


def unclaim(task_id: str) -> None:
    """Run ``task_id`` is not queued (publishing it failed, or it was skipped or failed
    before its body): its claim goes. A database error is logged: the claim then goes
    stale after ``singleton_queued_for``."""
    from cluster_singletons.tasks import claims

    try:
        claims.revoked(task_id, using=get_settings().database)
    except DATABASE_ERRORS as exc:
        logger.warning("task %s: its claim stays until stale (%s)", task_id, describe(exc))
        drop_if_unusable(get_settings().database)


def running(lock: ClusterLock) -> None:
    from cluster_singletons.tasks import claims

    if lock.task_id is not None:
        _hint(
            "mark its claim running",
            lock,
            lambda: claims.running(
                lock.lease, str(lock.task_id), holder=lock.term.runner_id, using=lock.using
            ),
        )


def finished(lock: ClusterLock) -> None:
    from cluster_singletons.tasks import claims

    if lock.task_id is not None:
        _hint(
            "finish its claim",
            lock,
            lambda: claims.finish(
                lock.lease, str(lock.task_id), holder=lock.term.runner_id, using=lock.using
            ),
        )


def _hint(what: str, lock: ClusterLock, write: Any) -> None:
    try:
        write()
    except DATABASE_ERRORS as exc:
        logger.warning(
            "task %s (%s) could not %s (%s); the claim ends with its lease",
            lock.task_id,
            lock,
            what,
            describe(exc),
        )
        drop_if_unusable(lock.using)


def on_revoked(request: Any = None, **_: Any) -> None:
    """Celery's ``task_revoked``: a revoked run of a ``drop`` task never runs, so its
    claim goes (a queued duplicate revoked leaves nothing behind)."""
    task = getattr(request, "task", None)
    task_id = getattr(request, "id", None)
    if getattr(task, "singleton_on_enqueue", None) == "drop" and task_id:
        unclaim(task_id)
