"""Celery wiring: tasks published inside a cluster context carry it to the worker.

Connected once from ``AppConfig.ready()``. The context rides in the ``cluster_context``
message header; on the worker it is active for the duration of the task, so
``context.current()`` inside the task names the singleton, epoch and tick that sent it.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from cluster_singletons import context

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


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    token = _TOKENS.pop(task_id or "", None)
    if token is not None:
        context.deactivate(token)


def connect() -> None:
    signals.before_task_publish.connect(_on_publish, weak=False, dispatch_uid="cs.publish")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="cs.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="cs.postrun")
