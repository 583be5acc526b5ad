"""``path("cluster/", include("cluster_singletons.urls"))``: probes and metrics.

Included while the app is not in ``INSTALLED_APPS``, the URLs are one pattern whose URL
check reports it (``cluster_singletons.E005``: ``manage.py check`` says what to add, with
no traceback) and which answers with that ``ImproperlyConfigured``.
"""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path
from django.urls.resolvers import RoutePattern

from cluster_singletons._installed import NOT_INSTALLED, installed

app_name = "cluster_singletons"


class _NotInstalled(URLPattern):
    """Every URL of the include, while the app is not installed."""

    def __init__(self) -> None:
        super().__init__(RoutePattern("<path:rest>", is_endpoint=True), _not_installed)

    def check(self) -> list[checks.CheckMessage]:
        return [checks.Error(NOT_INSTALLED, id="cluster_singletons.E005")]


def _not_installed(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    raise ImproperlyConfigured(NOT_INSTALLED)


if installed():
    from cluster_singletons import views

    urlpatterns: list[Any] = [
        path("health/live", views.live, name="live"),
        path("health/ready", views.ready, name="ready"),
        path("metrics", views.metrics, name="metrics"),
    ]
else:
    urlpatterns = [_NotInstalled()]
