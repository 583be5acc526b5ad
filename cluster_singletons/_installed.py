"""Whether the app is in ``INSTALLED_APPS``, said in one line where Django would raise a
RuntimeError about a model's ``app_label`` from deep inside an import (a leaf: the models,
the URLs and the Celery hosts ask it before importing anything that needs the app)."""

from __future__ import annotations

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured

NAME = "cluster_singletons"
NOT_INSTALLED = (
    f"{NAME} is not installed: add {NAME!r} to INSTALLED_APPS in your settings, "
    "then run `python manage.py migrate`"
)


def installed() -> bool:
    return apps.is_installed(NAME)


def require_installed() -> None:
    """``ImproperlyConfigured`` saying what to add, unless the app is installed."""
    if not installed():
        raise ImproperlyConfigured(NOT_INSTALLED)
