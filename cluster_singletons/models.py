"""Tables: the runner registry and the leases.

Timestamps that decide distributed questions are written by the database's clock
(``Now()`` in the statement), never by a node's wall clock.
"""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Now


class Runner(models.Model):
    """One OS process that takes part in the cluster; its registration is kept alive."""

    class Kind(models.TextChoices):
        RUNCLUSTER = "runcluster", "runcluster command"
        BEAT = "beat", "Celery beat"
        WORKER = "worker", "Celery worker"

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

    def __str__(self) -> str:
        return f"lease {self.name!r} (epoch {self.epoch})"
