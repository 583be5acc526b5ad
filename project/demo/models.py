from django.db import models
from django.db.models.functions import Now


class FencedWrite(models.Model):
    """One row written by a leader inside a fenced transaction (see ``demo.work``)."""

    lease = models.CharField(max_length=200)
    runner_id = models.BigIntegerField()
    epoch = models.BigIntegerField()
    written_at = models.DateTimeField(db_default=Now())

    class Meta:
        indexes = [models.Index(fields=["lease", "epoch"])]


class Document(models.Model):
    """Rows the demo ``indexer`` singleton walks in batches."""

    title = models.CharField(max_length=200)
    indexed = models.BooleanField(default=False)
