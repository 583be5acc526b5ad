"""``SingletonTask``: a Celery task base class that runs at most one body per key.

::

    @app.task(base=SingletonTask, singleton_key=("user_id",), singleton_on_held="retry")
    def recompute(user_id, force=False): ...

    @app.task(base=SingletonTask, bind=True)
    def export(self, account_id):
        with self.cluster_lock.fenced():  # commits only while this run holds the key
            Export.objects.create(account_id=account_id, epoch=self.cluster_lock.epoch)

The guarantee is taken in the worker, around the body (``__call__``), so every producer
reaches it: ``delay``/``apply_async``, ``send_task``, the beat, retries. Options are task
attributes, set per task in the decorator (Celery's convention) or on a subclass:

- ``singleton_key``: the argument names the key is made of (bound to the signature),
  a callable of the call's ``(*args, **kwargs)``, ``()`` for one key per task, or None
  (the default) for every argument.
- ``singleton_on_held``: what a run that finds its key held does: ``"skip"`` (default;
  its result state is ``SKIPPED``, with the key in its meta), ``"retry"`` (Celery's
  ``self.retry`` after ``singleton_retry_countdown`` seconds, default the lease TTL;
  ``max_retries`` applies, then it fails with ``TaskKeyHeld``) or ``"wait"`` (tries again
  for up to ``singleton_wait`` seconds, then fails with ``TaskKeyHeld``).
- ``singleton_on_enqueue``: ``"enqueue"`` (default) or ``"drop"``: ``apply_async`` of a key
  already queued or running returns that run's ``AsyncResult`` (see ``enqueue``).

A call whose key cannot be made fails with ``TaskKeyInvalid`` naming the task, before any
lease is touched. A database error while taking the key retries the run (Celery's retry,
backed off as the package's loops are; ``max_retries`` applies): it never runs unlocked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NoReturn

from celery import Task
from celery.exceptions import Ignore, Retry
from kombu.utils.uuid import uuid

from cluster_singletons import metrics
from cluster_singletons._connection import DATABASE_ERRORS, drop_if_unusable
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import NoClusterLock, TaskKeyHeld, describe
from cluster_singletons.pacing import Backoff
from cluster_singletons.tasks import enqueue, keys
from cluster_singletons.tasks.keys import KeySpec, TaskKey

if TYPE_CHECKING:  # both import the models: a task module may be imported before setup
    from cluster_singletons.tasks.holder import Holder
    from cluster_singletons.tasks.lock import ClusterLock

logger = logging.getLogger("cluster_singletons.tasks")

#: The result state of a run skipped because its key was held.
SKIPPED = "SKIPPED"

OnHeld = Literal["skip", "retry", "wait"]
OnEnqueue = Literal["enqueue", "drop"]
ON_HELD: tuple[OnHeld, ...] = ("skip", "retry", "wait")

#: The lock of the singleton body running in this thread (or task of an event loop).
_running: ContextVar[ClusterLock | None] = ContextVar("cluster_task_lock", default=None)


class SingletonTask(Task):  # type: ignore[type-arg]  # generic only in the stubs
    """Runs its body only while this process holds the call's key; see the module."""

    singleton_key: ClassVar[KeySpec] = None
    singleton_on_held: ClassVar[OnHeld] = "skip"
    singleton_wait: ClassVar[float] = 30.0
    singleton_retry_countdown: ClassVar[float | None] = None
    singleton_on_enqueue: ClassVar[OnEnqueue] = "enqueue"
    singleton_queued_for: ClassVar[float] = 3600.0

    @property
    def cluster_lock(self) -> ClusterLock:
        """The key this run holds (key, epoch, ``fenced()``), while its body runs."""
        lock = _running.get()
        if lock is None or lock.key.task != self.name:
            raise NoClusterLock(self.name)
        return lock

    def singleton_key_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskKey:
        """The key a call with these arguments runs under (``TaskKeyInvalid`` if none)."""
        spec = self.singleton_key
        if callable(spec):
            spec = _unbound(spec)
        return keys.key_of(
            self.name, self.run, spec, args, kwargs, key_prefix=get_settings().key_prefix
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.singleton_on_held not in ON_HELD:
            raise ValueError(
                f"singleton task {self.name!r}: singleton_on_held must be one of "
                f"{', '.join(ON_HELD)}, not {self.singleton_on_held!r}"
            )
        from cluster_singletons.tasks import holder as holders

        key = self.singleton_key_of(args, kwargs)
        holder = holders.current()
        claimed = self.singleton_on_enqueue == "drop"
        try:
            lock = self._take(holder, key)
        except Retry:
            raise  # queued again under the same id: the claim stays its
        except BaseException:
            if claimed and self.request.id:
                enqueue.unclaim(self.request.id)  # skipped or failed: nothing queued now
            raise
        if claimed:
            enqueue.running(lock)
        token = _running.set(lock)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _running.reset(token)
            holder.release(lock)
            if claimed:
                enqueue.finished(lock)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        """Celery's ``apply_async``; with ``singleton_on_enqueue="drop"`` a call whose key
        is queued or running already publishes nothing and returns that run's result."""
        if self.singleton_on_enqueue not in enqueue.ON_ENQUEUE:
            raise ValueError(
                f"singleton task {self.name!r}: singleton_on_enqueue must be one of "
                f"{', '.join(enqueue.ON_ENQUEUE)}, not {self.singleton_on_enqueue!r}"
            )
        if self.singleton_on_enqueue == "enqueue":
            return super().apply_async(args, kwargs, task_id, *rest, **options)
        retrying = task_id is not None and task_id == self.request.id  # self.retry()
        task_id = task_id or uuid()
        try:
            holder = enqueue.claim(self, args, kwargs, task_id)
        except DATABASE_ERRORS as exc:
            if not retrying:
                raise
            # A run retried because the database is down must still be queued again.
            logger.warning("task %s[%s]: retried unclaimed (%s)", self.name, task_id, describe(exc))
            holder = task_id
        if holder != task_id:
            return self.AsyncResult(holder)
        try:
            return super().apply_async(args, kwargs, task_id, *rest, **options)
        except BaseException:
            enqueue.unclaim(task_id)
            raise

    # -- taking the key ---------------------------------------------------------------

    def _take(self, holder: Holder, key: TaskKey) -> ClusterLock:
        task_id = self.request.id
        try:
            lock = holder.acquire(key, task_id=task_id)
            if lock is None and self.singleton_on_held == "wait":
                lock = holder.wait_for(key, task_id=task_id, timeout=self.singleton_wait)
                if lock is None:
                    metrics.TASK_KEYS_SKIPPED.labels(self.name, "wait").inc()
                    raise TaskKeyHeld(self.name, key.value, waited=self.singleton_wait)
        except DATABASE_ERRORS as exc:
            self._database_unreachable(key, exc)
        if lock is not None:
            return lock
        if self.singleton_on_held == "retry":
            metrics.TASK_KEYS_SKIPPED.labels(self.name, "retry").inc()
            countdown = self.singleton_retry_countdown
            logger.info("task %s[%s]: key %s is held; retrying", self.name, task_id, key.value)
            raise self.retry(
                exc=TaskKeyHeld(self.name, key.value),
                countdown=get_settings().lease_ttl if countdown is None else countdown,
            )
        self._skip(key)

    def _skip(self, key: TaskKey) -> NoReturn:
        metrics.TASK_KEYS_SKIPPED.labels(self.name, "skip").inc()
        logger.info(
            "task %s[%s]: key %s is held by another run; skipped",
            self.name,
            self.request.id,
            key.value,
        )
        if self.request.id is not None and not self.request.called_directly:
            self.update_state(state=SKIPPED, meta={"key": key.value, "lease": key.lease})
        raise Ignore()

    def _database_unreachable(self, key: TaskKey, exc: Exception) -> NoReturn:
        settings = get_settings()
        delay = Backoff.from_settings(settings, failures=self.request.retries or 0).delay
        logger.warning(
            "task %s[%s]: could not take key %s (%s); retrying in %.1fs, not running unlocked",
            self.name,
            self.request.id,
            key.value,
            describe(exc),
            delay,
        )
        drop_if_unusable(settings.database)
        raise self.retry(exc=exc, countdown=delay)


def _unbound(spec: Callable[..., Any]) -> Callable[..., Any]:
    """A key function set as a class attribute comes back as a method of the task."""
    return getattr(spec, "__func__", spec)
