from __future__ import annotations

import os

from celery import Celery

from cluster_singletons.worker import install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
install(app)  # `celery -A project worker --cluster` hosts singletons
