"""The admin's page of singleton task keys held now: read-only (``cluster_task_keys``
force-releases one).

Each row is a task key's lease held unexpired: the task, the key's epoch, the holding
process (host, pid, its runner id), since when, until when unless renewed, and the run's
task id when it was enqueued with ``singleton_on_enqueue="drop"``.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.http import HttpRequest

from cluster_singletons.conf import get_settings
from cluster_singletons.models import HeldTaskKey
from cluster_singletons.tasks import claims
from cluster_singletons.tasks.keys import TASK_PREFIX


@admin.register(HeldTaskKey)
class HeldTaskKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "task", "epoch", "host", "pid", "task_id", "acquired_at", "expires_at")
    search_fields = ("name",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[HeldTaskKey]:
        prefix = get_settings().key_prefix + TASK_PREFIX
        return (
            super()
            .get_queryset(request)
            .filter(name__startswith=prefix, holder__isnull=False, expires_at__gt=Now())
            .select_related("holder")
        )

    @admin.display(description="task")
    def task(self, row: HeldTaskKey) -> str:
        prefix = get_settings().key_prefix + TASK_PREFIX
        return row.name.removeprefix(prefix).rsplit(":", 1)[0]

    @admin.display(description="host")
    def host(self, row: HeldTaskKey) -> str:
        return row.holder.host if row.holder else "-"

    @admin.display(description="pid")
    def pid(self, row: HeldTaskKey) -> Any:
        return row.holder.pid if row.holder else "-"

    @admin.display(description="task id")
    def task_id(self, row: HeldTaskKey) -> str:
        return claims.holding(row.name, using=get_settings().database) or "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("cluster_singletons.view_lease")
