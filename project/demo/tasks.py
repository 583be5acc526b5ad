from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="demo.ping")
def ping(note: str = "") -> str:
    logger.info("ping %s", note)
    return note
