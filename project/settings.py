"""Example project; it doubles as the test project.

With no environment it runs on the embedded default: SQLite in ``var/`` and kombu's
filesystem transport, so no server is needed. ``DATABASE_URL`` (postgres://...) and
``CELERY_BROKER_URL`` (redis://..., amqp://...) switch to real servers.
``CLUSTER_SINGLETONS_JSON`` overrides cluster settings (used by tests and the demo), and
``CELERY_BEAT_SCHEDULE_JSON`` sets Celery's ``beat_schedule``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CLUSTER_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-secret")
# Off unless asked: DJANGO_DEBUG=1 turns Django's debug pages on for local work.
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "cluster_singletons",
    "project.demo",
    "project.reports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def database_from_url(url: str) -> dict[str, Any]:
    """A DATABASES entry from ``postgres://user:pass@host:port/name`` or ``sqlite:///path``."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:////abs/path is absolute, sqlite:///rel/path relative to the working dir.
        return sqlite_database(Path(unquote(parts.path)[1:]).resolve())
    if parts.scheme in {"postgres", "postgresql", "pgsql"}:
        name = unquote(parts.path.lstrip("/"))
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 0,
            "TEST": {"NAME": f"test_{name}"},
        }
    raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not supported (postgres, sqlite)")


def sqlite_database(path: Path) -> dict[str, Any]:
    # WAL lets readers run beside the writer; IMMEDIATE takes the write lock at BEGIN so
    # two processes never deadlock upgrading a read lock; the timeout waits for the lock.
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 10,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
        # A file, not memory, so test runner processes share the test database.
        "TEST": {"NAME": str(path.with_name(f"test_{path.name}"))},
    }


DATABASES = {
    "default": database_from_url(os.environ["DATABASE_URL"])
    if os.environ.get("DATABASE_URL")
    else sqlite_database(VAR_DIR / "db.sqlite3")
}

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CLUSTER_SINGLETONS: dict[str, Any] = json.loads(os.environ.get("CLUSTER_SINGLETONS_JSON", "{}"))

# Celery: the filesystem transport needs no server; CELERY_BROKER_URL picks a real one.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = VAR_DIR / "broker"
    _queue_dir.mkdir(exist_ok=True)
    (VAR_DIR / "broker-control").mkdir(exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "control_folder": str(VAR_DIR / "broker-control"),
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = TIME_ZONE
# Tests and the demo pass Celery's beat_schedule as JSON (a schedule in seconds).
CELERY_BEAT_SCHEDULE: dict[str, Any] = json.loads(os.environ.get("CELERY_BEAT_SCHEDULE_JSON", "{}"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"}
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "cluster_singletons": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "project": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
