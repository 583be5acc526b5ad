"""The ``CLUSTER_SINGLETONS`` setting, validated once into a frozen model.

Read lazily (never at import time), cached, and re-read when Django's
``setting_changed`` signal fires (``override_settings`` in tests).
"""

from __future__ import annotations

import difflib
import functools
import logging
from typing import Any, Literal

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster_singletons.names import RESERVED_PREFIXES, Overlap

SETTING_NAME = "CLUSTER_SINGLETONS"


class ClusterSettings(BaseModel):
    """Every knob of cluster_singletons; durations are in seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lease_ttl: float = Field(10.0, gt=0, description="How long a lease lives without renewal.")
    renew_interval: float = Field(
        3.0, gt=0, description="How often a leader renews its leases (at most a third of the TTL)."
    )
    acquire_interval: float = Field(
        0.5, gt=0, description="How often a standby tries to take a lease it does not hold."
    )
    retry_backoff: float = Field(
        0.5, gt=0, description="First delay after a database error; doubles on each failure."
    )
    retry_backoff_max: float = Field(10.0, gt=0, description="Cap on that delay.")
    startup_timeout: float = Field(
        60.0, ge=0, description="A runner that cannot reach the database this long exits 1."
    )
    shutdown_timeout: float = Field(
        10.0, ge=0, description="How long shutdown waits for leader work to stop."
    )
    key_prefix: str = Field(
        "",
        max_length=64,
        description=(
            "Prefix of every key this deployment stores (leases, state, the run ledger, "
            "schedule records, heartbeats, deliveries), so several share one database."
        ),
    )

    @field_validator("key_prefix")
    @classmethod
    def _not_a_kind(cls, prefix: str) -> str:
        if prefix.startswith(RESERVED_PREFIXES):
            raise ValueError(
                f"may not start with {', '.join(RESERVED_PREFIXES)} (its keys would read as "
                "an unprefixed deployment's); end it with another word, e.g. 'shop:'"
            )
        return prefix

    database: str = Field("default", min_length=1, description="The DATABASES alias to use.")
    crash_detection: Literal["auto", "ttl"] = Field(
        "auto",
        description=(
            "'auto': on PostgreSQL a crashed holder is detected by its lost session, once "
            "the session is proven direct (behind a pooler: lease expiry, with a warning); "
            "'ttl': always wait for lease expiry."
        ),
    )
    clock_offset_warning: float = Field(
        1.0,
        gt=0,
        description=(
            "A runner whose wall clock is further than this many seconds from the "
            "database's logs a WARNING (the beat keeps to the database's clock either way)."
        ),
    )
    runner_forget_after: float = Field(
        3600.0, gt=0, description="Registrations not seen for this long are deleted."
    )
    snowflake_epoch_ms: int = Field(
        1_577_836_800_000,
        ge=0,
        description=(
            "Unix time in milliseconds that Snowflake timestamps count from (default "
            "2020-01-01T00:00:00Z; ids last 69 years). Never change it once ids exist."
        ),
    )
    machine_id_ttl: float = Field(
        30.0,
        gt=0,
        description=(
            "How long a process's Snowflake machine id lease lives without renewal; it is "
            "renewed every third of this, and a crashed process's id is free after it."
        ),
    )
    max_clock_rollback: float = Field(
        1.0,
        ge=0,
        description=(
            "A wall clock that steps back by at most this many seconds is waited out before "
            "the next Snowflake id; a larger step raises ClockMovedBackwards."
        ),
    )
    skip_if_older_than: float = Field(
        3600.0,
        ge=0,
        description=(
            "Beat catch-up: a missed tick older than this many seconds is recorded as skipped, "
            "never run; newer missed ticks of a schedule run once, coalesced. Per schedule: "
            "the 'skip_if_older_than' option."
        ),
    )
    overlap: Overlap = Field(
        "allow_all",
        description=(
            "Beat overlap policy when a schedule's previous run has not finished: "
            "'allow_all' dispatches regardless (as Celery's beat does), 'skip' records the "
            "tick as skipped, 'buffer_one' keeps one tick waiting. Per schedule: the "
            "'overlap' option, or the schedule's record in the admin."
        ),
    )
    overlap_timeout: float = Field(
        3600.0,
        gt=0,
        description=(
            "A dispatched run that has not reported finishing after this many seconds no "
            "longer blocks its schedule (its worker may have died)."
        ),
    )
    stale_threshold: float = Field(
        2.0,
        gt=1,
        description=(
            "Health: a singleton is stale when its last execution is older than this many "
            "times its expected interval (a cron function: its next run is overdue by "
            "stale_grace)."
        ),
    )
    stale_grace: float = Field(
        30.0,
        ge=0,
        description="Health: seconds after a leader starts before missing heartbeats count.",
    )
    health_token: str = Field(
        "",
        description=(
            "Health endpoint and metrics: a bearer token that unlocks detail for non-staff "
            "callers (monitoring). Empty: only staff see detail."
        ),
    )
    beat_batch_window: float = Field(
        0.02,
        ge=0,
        description=(
            "The leading beat waits at least this long between passes, so ticks falling due "
            "close together are published in one batch (adds at most this to lateness)."
        ),
    )
    beat_lookahead: float = Field(
        1.0,
        ge=0,
        description=(
            "The leading beat records a tick in the ledger and builds its message up to this "
            "long before it is due, so only the broker round trip is left when it is. An edit "
            "or pause reaches ticks further ahead than this; 0 plans every tick when due."
        ),
    )
    beat_standby: Literal["warm", "cold"] = Field(
        "warm",
        description=(
            "What a runner standing by for the beat keeps: 'warm' keeps every schedule "
            "loaded and follows the run ledger, so a takeover dispatches at once; 'cold' "
            "loads the schedules when it takes over (seconds at 100k schedules)."
        ),
    )
    probe_file: str = Field(
        "",
        description=(
            "A file each runner writes from its loop (JSON: its runner id, pid, loop time, "
            "last renewal), for per-process liveness and readiness probes: `manage.py "
            "cluster_probe live|ready` or, without Django, `python -m "
            "cluster_singletons.cluster.probe live|ready FILE`. '{kind}' in the path is the "
            "runner's kind (beat, runcluster, worker). Empty: no file."
        ),
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "Serve this process's Prometheus metrics at http://metrics_address:PORT/metrics "
            "from every runner process (beat, runcluster, --cluster worker); None: not served."
        ),
    )
    metrics_address: str = Field(
        "127.0.0.1", min_length=1, description="The address metrics_port listens on."
    )
    beat_refresh_interval: float = Field(
        5.0,
        gt=0,
        description="How often the leading beat looks for changed schedules.",
    )


def parse(raw: object) -> ClusterSettings:
    """Validate a raw ``CLUSTER_SINGLETONS`` value; raises ``ValidationError`` or ``TypeError``."""
    if raw is None:
        return ClusterSettings()
    if not isinstance(raw, dict):
        raise TypeError(f"{SETTING_NAME} must be a dict, not {type(raw).__name__}")
    return ClusterSettings.model_validate(raw)


def explain(exc: ValidationError) -> list[tuple[str, str]]:
    """Each error of ``exc`` as (key, one line saying what is wrong). Never with the value
    given: it may be a secret (a mistyped ``health_token`` key is a token). An unknown key
    names the nearest known one."""
    found = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        where = f"{SETTING_NAME}[{key!r}]"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, ClusterSettings.model_fields, n=1)
            guess = f" (did you mean {near[0]!r}?)" if near else ""
            found.append((key, f"{where} is not a setting{guess}"))
        else:
            found.append((key, f"{where}: {err['msg']}"))
    return found


def raw_setting() -> Any:
    return getattr(django_settings, SETTING_NAME, None)


@functools.cache
def get_settings() -> ClusterSettings:
    """The validated settings; ``ImproperlyConfigured`` names the bad key."""
    try:
        return parse(raw_setting())
    except TypeError as exc:
        raise ImproperlyConfigured(str(exc)) from None
    except ValidationError as exc:
        lines = "; ".join(line for _, line in explain(exc))
        raise ImproperlyConfigured(
            f"{SETTING_NAME} is invalid: {lines} (`python manage.py check` gives hints)"
        ) from None


def refuse_to_start(exc: ImproperlyConfigured, log: logging.Logger) -> SystemExit:
    """For a host Celery starts (the beat, a worker), whose errors Celery would log with a
    traceback: log the misconfiguration as one line and return the exit (status 1) to
    raise instead."""
    log.error("cannot start: %s", exc)
    return SystemExit(1)


def reset_cache(*, setting: str, **_: object) -> None:
    """Receiver for ``setting_changed``."""
    if setting == SETTING_NAME:
        get_settings.cache_clear()
