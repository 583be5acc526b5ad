"""Django system checks for the ``CLUSTER_SINGLETONS`` setting and the database."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core import checks
from django.db import DatabaseError, connections
from pydantic import ValidationError

from cluster_singletons.cluster import crash_detection
from cluster_singletons.conf import SETTING_NAME, explain, parse, raw_setting
from cluster_singletons.errors import describe

_DOCS_HINT = "See the Settings section of the cluster_singletons README."


@checks.register(checks.Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001 not a dict, E002 a bad value, E003 renewal too slow for the TTL, E004 bad alias."""
    try:
        conf = parse(raw_setting())
    except TypeError as exc:
        return [checks.Error(str(exc), hint=_DOCS_HINT, id="cluster_singletons.E001")]
    except ValidationError as exc:
        return [
            checks.Error(line, hint=_hint_for(key), id="cluster_singletons.E002")
            for key, line in explain(exc)
        ]
    errors: list[checks.CheckMessage] = []
    if conf.renew_interval > conf.lease_ttl / 3:
        errors.append(
            checks.Error(
                f"{SETTING_NAME}['renew_interval'] ({conf.renew_interval}s) is above a third of "
                f"'lease_ttl' ({conf.lease_ttl}s): one slow renewal would lose the lease.",
                hint=f"Set 'renew_interval' to at most {conf.lease_ttl / 3:.3g}s "
                "or raise 'lease_ttl'.",
                id="cluster_singletons.E003",
            )
        )
    if conf.database not in django_settings.DATABASES:
        errors.append(
            checks.Error(
                f"{SETTING_NAME}['database'] names {conf.database!r}, which is not in DATABASES.",
                hint=f"Use one of: {', '.join(sorted(django_settings.DATABASES))}.",
                id="cluster_singletons.E004",
            )
        )
    else:
        errors.extend(sqlite_warnings(conf.database, django_settings.DATABASES[conf.database]))
    if conf.retry_backoff > conf.retry_backoff_max:
        errors.append(
            checks.Warning(
                f"{SETTING_NAME}['retry_backoff'] is above 'retry_backoff_max'; "
                "every retry will wait the maximum.",
                hint="Lower 'retry_backoff' or raise 'retry_backoff_max'.",
                id="cluster_singletons.W003",
            )
        )
    return errors


@checks.register(checks.Tags.database)
def check_crash_detection(
    app_configs: Any = None, *, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W004: ``crash_detection='auto'`` but the cluster's connection is not a direct
    server session (a pooler), so runners will fall back to lease expiry. A database check:
    it runs with ``check --database`` and ``migrate``."""
    try:
        conf = parse(raw_setting())
    except (TypeError, ValidationError):
        return []  # check_settings reports these
    if not databases or conf.database not in databases or conf.crash_detection != "auto":
        return []
    conn = connections[conf.database]
    if conn.vendor != "postgresql":
        return []
    try:
        reason = crash_detection.probe(conn.get_connection_params())
    except DatabaseError as exc:
        reason = f"it could not be checked ({describe(exc)})"
    if reason is None:
        return []
    return [
        checks.Warning(
            f"Crash detection by session is not available on database {conf.database!r}: "
            f"{reason}. Runners fall back to lease expiry: a crashed leader's leases are "
            f"taken over after up to 'lease_ttl' ({conf.lease_ttl}s), not at once.",
            hint=f"Set {SETTING_NAME}['crash_detection'] = 'ttl' to say so, or point "
            f"{SETTING_NAME}['database'] at a DATABASES alias that connects to PostgreSQL "
            "directly (not through PgBouncer in transaction mode).",
            id="cluster_singletons.W004",
        )
    ]


def sqlite_warnings(alias: str, db: dict[str, Any]) -> list[checks.CheckMessage]:
    """W001/W002: settings that let several processes share one SQLite file."""
    if "sqlite3" not in db.get("ENGINE", ""):
        return []
    options = db.get("OPTIONS", {})
    found: list[checks.CheckMessage] = []
    if str(options.get("transaction_mode", "")).upper() != "IMMEDIATE":
        found.append(
            checks.Warning(
                f"SQLite database {alias!r} does not use IMMEDIATE transactions: runners in "
                "several processes will fail with 'database is locked'.",
                hint="Set DATABASES[...]['OPTIONS']['transaction_mode'] = 'IMMEDIATE'.",
                id="cluster_singletons.W001",
            )
        )
    if "journal_mode=wal" not in str(options.get("init_command", "")).lower().replace(" ", ""):
        found.append(
            checks.Warning(
                f"SQLite database {alias!r} is not in WAL mode: readers block the leader's writes.",
                hint="Set DATABASES[...]['OPTIONS']['init_command'] = 'PRAGMA journal_mode=WAL;'.",
                id="cluster_singletons.W002",
            )
        )
    return found


def _hint_for(key: str) -> str:
    from cluster_singletons.conf import ClusterSettings

    field = ClusterSettings.model_fields.get(key)
    if field is None:
        known = ", ".join(sorted(ClusterSettings.model_fields))
        return f"Unknown key; the known keys are: {known}."
    return f"{key}: {field.description} Default: {field.default!r}."
