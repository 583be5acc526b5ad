"""Tables: the runner registry and the leases.

Timestamps that decide distributed questions are written by the database's clock
(``Now()`` in the statement), never by a node's wall clock.
"""

from __future__ import annotations

import math

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Now

from cluster_singletons.names import OVERLAP_CHOICES

#: The longest schedule key stored (``periodic:`` + a django-celery-beat name of 200 fits).
SCHEDULE_KEY_MAX = 255
#: The longest catch-up horizon an operator may set on a schedule: ten years.
MAX_CATCH_UP = 10 * 365 * 86400


def validate_catch_up(value: float | None) -> None:
    """A catch-up horizon is a finite number of seconds from 0 to ``MAX_CATCH_UP``."""
    if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_CATCH_UP):
        raise ValidationError(
            f"{value!r} is not a catch-up horizon: give seconds from 0 to {MAX_CATCH_UP:,} "
            "(ten years), or leave it empty"
        )


class Runner(models.Model):
    """One OS process that takes part in the cluster; its registration is kept alive."""

    class Kind(models.TextChoices):
        RUNCLUSTER = "runcluster", "runcluster command"
        BEAT = "beat", "Celery beat"
        WORKER = "worker", "Celery worker"
        TASK = "task", "Celery task holder"

    id = models.BigAutoField(primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.IntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    started_at = models.DateTimeField(db_default=Now())
    last_seen = models.DateTimeField(
        db_default=Now(), help_text="Database time of the last sign of life."
    )
    stopping = models.BooleanField(default=False, help_text="Shutting down: hands off its leases.")
    liveness_lock = models.BooleanField(
        default=False,
        help_text="Holds a PostgreSQL advisory lock while alive, so its crash is seen at once.",
    )
    crash_detection = models.CharField(
        max_length=300,
        blank=True,
        default="",
        help_text="How its crash is detected: 'session', or why its leases fall back to expiry.",
    )
    clock_offset = models.FloatField(
        null=True,
        blank=True,
        help_text="Database clock minus this process's wall clock, in seconds (estimated).",
    )

    class Meta:
        indexes = [models.Index(fields=["last_seen"], name="cs_runner_last_seen")]

    def __str__(self) -> str:
        return f"runner {self.id} ({self.host}:{self.pid}, {self.kind})"


class Lease(models.Model):
    """Leadership of one name. ``epoch`` rises on every acquisition: it is the fencing token."""

    name = models.CharField(max_length=200, primary_key=True)
    holder = models.ForeignKey(
        Runner, null=True, blank=True, on_delete=models.SET_NULL, related_name="leases"
    )
    epoch = models.BigIntegerField(default=0)
    acquired_at = models.DateTimeField(null=True, blank=True)
    renewed_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    handoff_requested = models.BooleanField(
        default=False, help_text="An operator asked the holder to hand this lease off."
    )
    handed_off_by = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="The runner that handed it off; it may take it back only a TTL later.",
    )

    def __str__(self) -> str:
        return f"lease {self.name!r} (epoch {self.epoch})"


class TaskClaim(models.Model):
    """A singleton task run enqueued with ``singleton_on_enqueue="drop"``, while it is queued
    or running: an enqueue of the same key meanwhile returns its task id instead."""

    lease = models.CharField(max_length=200, primary_key=True)
    task = models.CharField(max_length=255)
    task_id = models.CharField(max_length=255)
    claimed_at = models.DateTimeField(db_default=Now())
    holder = models.BigIntegerField(
        null=True, blank=True, help_text="The task holder running it; empty while it is queued."
    )

    class Meta:
        indexes = [models.Index(fields=["task_id"], name="cs_task_claim_task_id")]

    def __str__(self) -> str:
        return f"claim {self.lease!r} by {self.task_id}"


class HeldTaskKey(Lease):
    """The admin's page of singleton task keys held now (the lease table, no table of its own)."""

    class Meta:
        proxy = True
        verbose_name = "held task key"


class StateRecord(models.Model):
    """The durable, typed state of one key (a singleton's, or a standalone store's).

    ``value`` is the JSON text as stored, so a row this code cannot decode can still be
    read, shown and repaired; ``version`` is the compare-and-swap counter.
    """

    class Status(models.TextChoices):
        OK = "ok", "ok"
        QUARANTINED = "quarantined", "quarantined"

    key = models.CharField(max_length=255, primary_key=True)
    value = models.TextField()
    schema_version = models.PositiveIntegerField(default=1)
    version = models.BigIntegerField(default=1)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OK)
    problem = models.TextField(blank=True, default="", help_text="Why it is quarantined.")
    updated_at = models.DateTimeField(db_default=Now())
    updated_epoch = models.BigIntegerField(null=True, blank=True)

    def __str__(self) -> str:
        return f"state {self.key!r} v{self.version}"


class StateHistory(models.Model):
    """An old value kept when state is reset, quarantined, upgraded or edited."""

    class Reason(models.TextChoices):
        RESET = "reset", "reset"
        QUARANTINE = "quarantine", "quarantined"
        UPGRADE = "upgrade", "schema upgrade"
        EDIT = "edit", "edited"

    key = models.CharField(max_length=255)
    value = models.TextField()
    schema_version = models.PositiveIntegerField()
    version = models.BigIntegerField()
    reason = models.CharField(max_length=16, choices=Reason.choices)
    note = models.TextField(blank=True, default="")
    recorded_at = models.DateTimeField(db_default=Now())

    class Meta:
        verbose_name_plural = "state history"
        indexes = [models.Index(fields=["key", "-recorded_at"], name="cs_state_history_key")]


class StepRecord(models.Model):
    """The recorded result of ``ctx.step(name, fn)`` for one run of one singleton."""

    singleton = models.CharField(max_length=200)
    run_key = models.CharField(max_length=200)
    name = models.CharField(max_length=200)
    result = models.TextField()
    epoch = models.BigIntegerField()
    recorded_at = models.DateTimeField(db_default=Now())

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["singleton", "run_key", "name"], name="cs_step_once_per_run"
            )
        ]


class MachineId(models.Model):
    """A Snowflake machine id (0-1023) leased to one process; ``holder`` names the lease.

    Expiry is written by the database's clock. ``high_water_ms`` bounds the timestamps of
    every id issued under this machine id so far, so the next holder starts after it.
    """

    id = models.PositiveSmallIntegerField(primary_key=True)
    holder = models.CharField(
        max_length=64, null=True, blank=True, help_text="Token of the holding process's lease."
    )
    host = models.CharField(max_length=255, blank=True, default="")
    pid = models.IntegerField(null=True, blank=True)
    acquired_at = models.DateTimeField(null=True, blank=True)
    renewed_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    high_water_ms = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="Unix ms: no id issued under this machine id has a later timestamp.",
    )

    class Meta:
        verbose_name = "Snowflake machine id"

    def __str__(self) -> str:
        if self.holder:
            return f"machine id {self.id} ({self.host}:{self.pid})"
        return f"machine id {self.id} (free)"


class Run(models.Model):
    """One entry of the run ledger: a tick of a schedule, dispatched once, or skipped.

    ``(schedule, tick)`` is unique: that constraint is what makes a tick dispatch at most
    once across leaders. A row is inserted fenced on the beat's epoch with its dispatch
    intent (``pending``); the task is published after commit and the row marked
    ``published``; a new leader re-publishes ``pending`` rows with the same ``task_id``.
    A row can stand for several ticks (``first_tick`` .. ``tick``, ``ticks`` of them) when
    missed ticks were coalesced into one run or skipped together.
    """

    class Kind(models.TextChoices):
        SCHEDULED = "scheduled", "scheduled"
        MANUAL = "manual", "run now"
        BACKFILL = "backfill", "backfill"
        DELIVERY = "delivery", "delayed delivery"

    class Status(models.TextChoices):
        PENDING = "pending", "pending (not yet published)"
        PUBLISHED = "published", "published"
        STARTED = "started", "started"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        SKIPPED = "skipped", "skipped"
        ERROR = "error", "schedule error"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.SKIPPED, Status.ERROR)

    id = models.BigAutoField(primary_key=True)
    schedule = models.CharField(max_length=SCHEDULE_KEY_MAX)
    tick = models.DateTimeField()
    first_tick = models.DateTimeField(null=True, blank=True)
    ticks = models.PositiveIntegerField(default=1)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.SCHEDULED)
    status = models.CharField(max_length=16, choices=Status.choices)
    reason = models.TextField(blank=True, default="")
    task = models.CharField(max_length=255, blank=True, default="")
    task_id = models.CharField(max_length=64, blank=True, default="")
    message = models.TextField(blank=True, default="", help_text="args, kwargs and options (JSON).")
    epoch = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    published_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["schedule", "tick"], name="cs_run_once_per_tick")
        ]
        indexes = [
            models.Index(
                fields=["created_at"],
                name="cs_run_pending",
                condition=models.Q(status="pending"),
            ),
            models.Index(fields=["task_id"], name="cs_run_task_id"),
            models.Index(fields=["created_at"], name="cs_run_created"),
        ]

    def __str__(self) -> str:
        return f"{self.schedule} @ {self.tick.isoformat()} ({self.status})"


class ScheduleRecord(models.Model):
    """What the beat keeps per schedule: the last tick it recorded, pause, overrides, problems."""

    key = models.CharField(max_length=SCHEDULE_KEY_MAX, primary_key=True)
    last_tick = models.DateTimeField(null=True, blank=True)
    paused = models.BooleanField(default=False)
    pause_note = models.TextField(blank=True, default="")
    skip_if_older_than = models.FloatField(
        null=True,
        blank=True,
        validators=[validate_catch_up],
        help_text="Seconds (0 to ten years); empty: the schedule's own option or the setting.",
    )
    overlap = models.CharField(
        max_length=16,
        blank=True,
        default="",
        choices=OVERLAP_CHOICES,
        help_text="Empty: the schedule's own option or the setting.",
    )
    problem = models.TextField(blank=True, default="", help_text="Why it cannot be scheduled.")
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        indexes = [
            # Warm standbys read the paused records every second.
            models.Index(fields=["key"], name="cs_record_paused", condition=models.Q(paused=True))
        ]

    def __str__(self) -> str:
        return f"schedule {self.key!r}"


class Delivery(models.Model):
    """A Celery task stored until it is due, then dispatched once by the leading beat."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        DISPATCHED = "dispatched", "dispatched"
        CANCELLED = "cancelled", "cancelled"

    id = models.BigIntegerField(primary_key=True, help_text="A Snowflake id.")
    task = models.CharField(max_length=255)
    message = models.TextField(help_text="args, kwargs and options (JSON).")
    due_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(db_default=Now())
    done_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        indexes = [
            models.Index(
                fields=["due_at"], name="cs_delivery_due", condition=models.Q(status="pending")
            )
        ]

    def __str__(self) -> str:
        return f"delivery {self.id} of {self.task} at {self.due_at.isoformat()} ({self.status})"


class Heartbeat(models.Model):
    """The last sign of progress of one singleton, ``@cron`` function or the beat.

    Written after every execution (and by ``ctx.heartbeat()``) with the database's clock;
    health statuses are computed from it, the lease and the expected interval.
    """

    name = models.CharField(max_length=200, primary_key=True, help_text="The lease or schedule.")
    runner_id = models.BigIntegerField(null=True, blank=True)
    epoch = models.BigIntegerField(null=True, blank=True)
    expected_interval = models.FloatField(help_text="Seconds between executions, at most.")
    beat_at = models.DateTimeField(null=True, blank=True, help_text="Last successful execution.")
    executions = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    failed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"heartbeat of {self.name!r}"


class ClusterHealth(Heartbeat):
    """The admin's cluster health dashboard (no table of its own)."""

    class Meta:
        proxy = True
        verbose_name = verbose_name_plural = "cluster health"
