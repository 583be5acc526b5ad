"""Probes and metrics: include ``cluster_singletons.urls`` under any prefix.

- ``health/live``: this process serves requests (no database touched). 200.
- ``health/ready``: the cluster's health: 200 when every check passes, else 503; 503 too,
  with ``{"status": "unavailable"}``, when the database cannot be reached. Only staff
  users or callers presenting ``Authorization: Bearer <health_token>`` see the detail.
- ``metrics``: Prometheus text format; open unless ``health_token`` is set, then it needs
  the token (or a staff session). Under ``PROMETHEUS_MULTIPROC_DIR`` every process's
  samples are aggregated.
"""

from __future__ import annotations

import hmac
import logging

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cluster_singletons.conf import get_settings
from cluster_singletons.errors import describe
from cluster_singletons.health.collector import ClusterCollector
from cluster_singletons.health.report import cluster_health
from cluster_singletons.metrics import process_registry

logger = logging.getLogger("cluster_singletons.views")

_CLUSTER = CollectorRegistry(auto_describe=False)
_CLUSTER.register(ClusterCollector())


def may_see_detail(request: HttpRequest) -> bool:
    """Staff users, or a caller with the configured bearer token."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    token = get_settings().health_token
    scheme, _, sent = request.headers.get("Authorization", "").strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110 11.1); the token is compared exactly.
    if not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(sent.strip().encode(), token.encode())


@never_cache
@require_GET
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    detail = may_see_detail(request)
    try:
        report = cluster_health(detail=detail)
    except DatabaseError as exc:
        logger.warning("health check: database unavailable: %s", describe(exc))
        body = {"status": "unavailable"}
        if detail:
            body["error"] = describe(exc)
        return JsonResponse(body, status=503)
    return JsonResponse(report.as_dict(detail=detail), status=200 if report.healthy else 503)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if get_settings().health_token and not may_see_detail(request):
        return HttpResponse("a bearer token is required\n", status=401, content_type="text/plain")
    body = generate_latest(process_registry())
    return HttpResponse(body + generate_latest(_CLUSTER), content_type=CONTENT_TYPE_LATEST)
