"""``path("cluster/", include("cluster_singletons.urls"))``: probes and metrics."""

from __future__ import annotations

from django.urls import path

from cluster_singletons import views

app_name = "cluster_singletons"
urlpatterns = [
    path("health/live", views.live, name="live"),
    path("health/ready", views.ready, name="ready"),
    path("metrics", views.metrics, name="metrics"),
]
