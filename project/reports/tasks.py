"""Nothing imports this module but Celery's autodiscovery (``app.autodiscover_tasks()``)."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="reports.send_report")
def send_report() -> str:
    return "sent"
