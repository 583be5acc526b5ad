"""Celery wiring: tasks published inside a cluster context carry it to the worker.

Connected once from ``AppConfig.ready()``. Tasks the beat dispatched from its run ledger
also report ``started`` and ``succeeded``/``failed`` to the ledger, so the overlap policy
knows across machines whether a schedule's previous run has finished. A revoked singleton
task's enqueue claim is deleted (``tasks.enqueue``). The context rides in
the ``cluster_context`` message header; on the worker it is active for the duration of the
task, so
``context.current()`` inside the task names the singleton, epoch and tick that sent it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from cluster_singletons import context

logger = logging.getLogger("cluster_singletons.celery")
_TOKENS: dict[str, Any] = {}


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    ctx = context.get()
    if ctx is not None and headers is not None and context.HEADER not in headers:
        headers[context.HEADER] = ctx.as_header()


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    raw = getattr(request, context.HEADER, None)
    if raw is None and request is not None:
        raw = (getattr(request, "headers", None) or {}).get(context.HEADER)
    ctx = context.ClusterContext.from_header(raw)
    if ctx is not None and task_id is not None:
        _TOKENS[task_id] = context.activate(ctx)
        if _is_ledger_run(ctx, task_id):
            _report(task_id, "started")


def _on_postrun(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    token = _TOKENS.pop(task_id or "", None)
    if token is not None:
        ctx = context.get()
        context.deactivate(token)
        if ctx is not None and task_id is not None and _is_ledger_run(ctx, task_id):
            _report(task_id, "succeeded" if state == "SUCCESS" else "failed")


def _is_ledger_run(ctx: context.ClusterContext, task_id: str) -> bool:
    """A task the beat dispatched from its run ledger (the overlap policy waits for it)."""
    return ctx.schedule is not None and ctx.task_id == task_id


def _report(task_id: str, status: str) -> None:
    from django.db import DatabaseError

    from cluster_singletons.beat import ledger
    from cluster_singletons.conf import get_settings

    try:
        ledger.report(task_id, status, using=get_settings().database)
    except DatabaseError as exc:  # the task itself must not fail for the ledger's sake
        logger.warning("could not record run %s as %s: %s", task_id, status, exc)


def connect() -> None:
    signals.before_task_publish.connect(_on_publish, weak=False, dispatch_uid="cs.publish")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="cs.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="cs.postrun")
    signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid="cs.revoked")


def _on_revoked(**kwargs: Any) -> None:
    from cluster_singletons.tasks import enqueue

    enqueue.on_revoked(**kwargs)
