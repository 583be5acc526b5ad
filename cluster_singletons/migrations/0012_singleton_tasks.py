# Singleton Celery tasks: task key holders are runners of their own kind; claims of the
# runs enqueued with singleton_on_enqueue="drop".

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("cluster_singletons", "0011_schedule_record_paused_index"),
    ]

    operations = [
        migrations.AlterField(
            model_name="runner",
            name="kind",
            field=models.CharField(
                choices=[
                    ("runcluster", "runcluster command"),
                    ("beat", "Celery beat"),
                    ("worker", "Celery worker"),
                    ("task", "Celery task holder"),
                ],
                max_length=16,
            ),
        ),
        migrations.CreateModel(
            name="TaskClaim",
            fields=[
                ("lease", models.CharField(max_length=200, primary_key=True, serialize=False)),
                ("task", models.CharField(max_length=255)),
                ("task_id", models.CharField(max_length=255)),
                (
                    "claimed_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                (
                    "holder",
                    models.BigIntegerField(
                        blank=True,
                        help_text="The task holder running it; empty while it is queued.",
                        null=True,
                    ),
                ),
            ],
            options={
                "indexes": [models.Index(fields=["task_id"], name="cs_task_claim_task_id")],
            },
        ),
        migrations.CreateModel(
            name="HeldTaskKey",
            fields=[],
            options={
                "verbose_name": "held task key",
                "proxy": True,
                "indexes": [],
                "constraints": [],
            },
            bases=("cluster_singletons.lease",),
        ),
    ]
