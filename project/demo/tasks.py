from __future__ import annotations

import json
import logging

from celery import shared_task

from cluster_singletons import context

logger = logging.getLogger(__name__)


@shared_task(name="demo.ping")
def ping(note: str = "") -> str:
    ctx = context.get()
    logger.info("ping %s context=%s", note, json.dumps(ctx.as_header() if ctx else None))
    return note
