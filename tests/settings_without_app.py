"""The example project with ``cluster_singletons`` left out of ``INSTALLED_APPS`` (and the
demo app that uses it): the mistake ``tests/test_mistakes.py`` makes on purpose."""

from __future__ import annotations

from project.settings import *  # noqa: F403
from project.settings import INSTALLED_APPS as _ALL

INSTALLED_APPS = [app for app in _ALL if app not in ("cluster_singletons", "project.demo")]
