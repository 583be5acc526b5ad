"""The leading beat's outbox: recorded runs, their messages built ahead, published when due.

A run enters the outbox once its intent is in the ledger, which for a scheduled tick is up
to ``beat_lookahead`` before the tick. Celery builds its message then: ``send_task`` runs
unchanged (routing, task options, the ``before_task_publish``/``after_task_publish``
signals) against a stand-in producer that keeps what it would publish. When the tick falls
due only the broker round trips are left: the kept messages go out through one real
producer in batches (``Producer.batch``: one Redis pipeline per batch on kombu >= 5.7,
message by message on transports without batches), and each flushed batch is marked
published with the time it was flushed.

A batch the broker refused stays ``pending`` in the ledger: the outbox is emptied and the
engine publishes what is pending again, same task ids, when the broker is back.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connections, transaction
from kombu import exceptions as kombu_errors
from kombu.serialization import dumps

from cluster_singletons import context, metrics
from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.beat import ledger
from cluster_singletons.clock import Clock
from cluster_singletons.cluster import heartbeats
from cluster_singletons.cluster.fencing import Term
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.errors import describe
from cluster_singletons.models import Run

logger = logging.getLogger("cluster_singletons.beat")

#: Broker failures: the runs concerned stay pending and are published again (a batch that
#: failed may have been delivered in part: kombu cannot tell, the same task ids can).
BROKER_ERRORS = (
    kombu_errors.OperationalError,
    getattr(kombu_errors, "BatchPublishError", kombu_errors.OperationalError),
    ConnectionError,
    OSError,
)
#: Runs published per batch, and marked published together.
BATCH = 200
#: A tick published later than this after it was due counts as late.
LATE = 1.0
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5}

#: An in-runner ``@cron`` function, called with its run.
Function = Callable[[Run], Any]


class _Keeper:
    """A producer stand-in: ``publish`` keeps its arguments; anything else Celery asks of a
    producer (its connection, its channel for a result backend) is the real one's."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.kept: list[tuple[Any, dict[str, Any]]] = []

    def publish(self, body: Any, **kwargs: Any) -> None:
        self.kept.append((body, kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


@dataclass(order=True, frozen=True)
class Outgoing:
    """A recorded run and what publishing it takes: Celery's messages, or a function."""

    tick: datetime
    seq: int
    run: Run = field(compare=False)
    messages: tuple[tuple[Any, dict[str, Any]], ...] = field(compare=False, default=())
    fn: Function | None = field(compare=False, default=None)


class Outbox:
    """The runs one leader term has recorded and not yet published, by tick."""

    def __init__(
        self,
        app: Any,
        *,
        using: str,
        clock: Clock,
        after_publish: Callable[[list[Run]], None],
    ) -> None:
        self.app = app
        self.using = using
        self.clock = clock
        self._after_publish = after_publish
        self._heap: list[Outgoing] = []
        self._seq = itertools.count()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def task_ids(self) -> set[str]:
        """The task ids of the runs waiting here."""
        return {outgoing.run.task_id for outgoing in self._heap}

    @property
    def next_at(self) -> datetime | None:
        """When the first run in the outbox falls due (None: empty)."""
        return self._heap[0].tick if self._heap else None

    def add(self, runs: list[Run], term: Term, functions: Mapping[str, Function]) -> bool:
        """Build the messages of ``runs``; False (logged) if the broker could not be asked,
        in which case the runs stay pending in the ledger only."""
        prepared = []
        unpublishable: dict[str, str] = {}
        try:
            with self.app.producer_or_acquire() as producer:
                for run in runs:
                    fn = functions.get(run.schedule)
                    try:
                        messages = () if fn is not None else self._messages(run, term, producer)
                    except BROKER_ERRORS:
                        raise
                    except Exception as exc:  # this run only: its row says why, others go on
                        logger.exception(
                            "the message of %s for %s cannot be built", run.task_id, run.schedule
                        )
                        metrics.SCHEDULE_ERRORS.labels(metrics.schedule_label(run.schedule)).inc()
                        unpublishable[run.task_id] = f"message cannot be built: {describe(exc)}"
                        continue
                    prepared.append(Outgoing(run.tick, next(self._seq), run, messages, fn))
        except BROKER_ERRORS as exc:
            logger.warning(
                "preparing %d run(s) failed (%s); they stay pending and are retried",
                len(runs),
                describe(exc),
            )
            return False
        if unpublishable:
            ledger.fail(unpublishable, using=self.using)
        for outgoing in prepared:
            heapq.heappush(self._heap, outgoing)
        return True

    def _messages(self, run: Run, term: Term, producer: Any) -> tuple[Any, ...]:
        message = ledger.message(run)
        keeper = _Keeper(producer)
        with context.within_cluster(**_context_fields(run, term)):
            self.app.send_task(
                run.task,
                args=message.get("args") or (),
                kwargs=message.get("kwargs") or {},
                task_id=run.task_id,
                producer=keeper,
                retry=True,
                retry_policy=_RETRY_POLICY,
                **dict(message.get("options") or {}),
            )
        return tuple(_serialized(body, kwargs, producer) for body, kwargs in keeper.kept)

    def publish_due(self, now: datetime, leadership: Leadership) -> bool:
        """Publish every run due by ``now`` while the term is believed; False if the
        broker refused a batch (the outbox is then emptied: its runs stay pending)."""
        published: list[Run] = []
        try:
            while self._heap and self._heap[0].tick <= now:
                if not leadership.running:
                    return True  # deposed or stopping: the next leader publishes the rest
                batch: list[Outgoing] = []
                while self._heap and self._heap[0].tick <= now and len(batch) < BATCH:
                    batch.append(heapq.heappop(self._heap))
                sent = self._flush(batch, leadership.term)
                if sent is None:
                    self.clear()
                    return False
                published.extend(sent)
            return True
        finally:
            # Bookkeeping outside the ledger waits until the due batches are out.
            if published:
                self._after_publish(published)

    def _flush(self, batch: list[Outgoing], term: Term) -> list[Run] | None:
        """Publish ``batch``; the runs published (a run kombu refuses becomes an error row),
        or None if the broker refused (all stay pending)."""
        refused: dict[str, str] = {}
        try:
            with self.app.producer_or_acquire() as producer, _batched(producer):
                for outgoing in batch:
                    try:
                        for body, kwargs in outgoing.messages:
                            producer.publish(body, **kwargs)
                    except BROKER_ERRORS:
                        raise
                    except Exception as exc:  # this run only (an option kombu rejects)
                        run = outgoing.run
                        logger.exception("%s for %s cannot be published", run.task_id, run.schedule)
                        metrics.SCHEDULE_ERRORS.labels(metrics.schedule_label(run.schedule)).inc()
                        refused[run.task_id] = f"message cannot be published: {describe(exc)}"
        except BROKER_ERRORS as exc:
            logger.warning(
                "publishing %d run(s) failed (%s); they stay pending and are retried",
                len(batch),
                describe(exc),
            )
            return None
        at = self.clock.now()
        if refused:
            ledger.fail(refused, using=self.using)
            batch = [o for o in batch if o.run.task_id not in refused]
        runs = [o.run for o in batch]
        ledger.mark_published([r.task_id for r in runs], at=at, using=self.using)
        for outgoing in batch:
            if outgoing.fn is not None:
                self._call(outgoing.fn, outgoing.run, term)
            if outgoing.run.kind == Run.Kind.SCHEDULED:
                late = (at - outgoing.run.tick).total_seconds()
                metrics.DISPATCH_LATENESS.observe(late)
                if late > LATE:
                    metrics.TICKS_LATE.labels(metrics.schedule_label(outgoing.run.schedule)).inc()
        return runs

    def clear(self) -> None:
        self._heap.clear()

    def close(self) -> None:
        self.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _call(self, fn: Function, run: Run, term: Term) -> None:
        """Run an in-runner ``@cron`` function in the leader's pool, reporting its end."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cron")
        fields = _context_fields(run, term)
        using = self.using

        def call() -> None:
            status, error = Run.Status.SUCCEEDED, None
            started = time.monotonic()
            with context.within_cluster(**fields):
                try:
                    ledger.report(run.task_id, Run.Status.STARTED, using=using)
                    fn(run)
                except Exception as exc:
                    status, error = Run.Status.FAILED, describe(exc)
                    metrics.ERRORS.labels(run.schedule.partition(":")[2], type(exc).__name__).inc()
                    logger.exception("cron %s failed for tick %s", run.schedule, run.tick)
                # The call may have met a database or pooler restart: report on a connection
                # that works.
                drop_if_unusable(using)
                try:
                    with transaction.atomic(using=using):  # the run's end and its heartbeat
                        ledger.report(run.task_id, status, using=using)
                        heartbeats.record(
                            run.schedule,
                            runner_id=term.runner_id,
                            epoch=term.epoch,
                            interval=0.0,
                            error=error,
                            duration=time.monotonic() - started,
                            using=using,
                        )
                except DatabaseError as exc:  # the run stays "started": its row says so
                    logger.warning(
                        "cron %s: the end of tick %s could not be recorded (%s)",
                        run.schedule,
                        run.tick,
                        describe(exc),
                    )
                finally:
                    # A pool thread serves the next call too: never with this connection,
                    # which the call may have left broken or inside a transaction.
                    connections.close_all()

        self._executor.submit(call)


def _serialized(body: Any, kwargs: dict[str, Any], producer: Any) -> tuple[Any, dict[str, Any]]:
    """The body serialized now, as ``Producer.publish`` would when it is sent: a body that
    cannot be is found while the run is recorded, and sending costs less."""
    if kwargs.get("content_type"):
        return body, kwargs
    kwargs = dict(kwargs)
    serializer = kwargs.pop("serializer", None) or producer.serializer
    kwargs["content_type"], kwargs["content_encoding"], body = dumps(body, serializer=serializer)
    return body, kwargs


def _context_fields(run: Run, term: Term) -> dict[str, Any]:
    return {
        "runner": term.runner_id,
        "is_leader": True,
        "epoch": term.epoch,
        "schedule": run.schedule,
        "tick": run.tick.isoformat(),
        "task_id": run.task_id,
    }


@contextlib.contextmanager
def _batched(producer: Any) -> Iterator[None]:
    """One broker round trip for the batch where kombu can (``Producer.batch``, 5.7+)."""
    batch = getattr(producer, "batch", None)
    if batch is None:
        yield
        return
    with batch(max_size=BATCH * 4):
        yield
