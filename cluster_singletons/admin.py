"""Django admin: a cluster health dashboard and pages to oversee and operate the cluster.

Every operation is a Django permission on the model it changes and is written to the
admin log: hand off (``change_lease``), reset state (``delete_staterecord``), edit state
(``change_staterecord``, validated against the singleton's model before saving), run now,
pause and resume (``change_schedulerecord``), cancel a delivery (``change_delivery``).
Registries, leases, the ledger and heartbeats are otherwise read-only: the runners write
them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from pydantic import ValidationError as ModelInvalid

from cluster_singletons import control, names
from cluster_singletons.beat import crons
from cluster_singletons.beat.schedule import Schedule
from cluster_singletons.beat.timetables import preview
from cluster_singletons.cluster import leases, membership
from cluster_singletons.conf import get_settings
from cluster_singletons.errors import ClusterSingletonsError, DeliveryNotCancellable
from cluster_singletons.health.report import cluster_health
from cluster_singletons.models import (
    ClusterHealth,
    Delivery,
    Lease,
    Run,
    Runner,
    ScheduleRecord,
    StateHistory,
    StateRecord,
)

logger = logging.getLogger("cluster_singletons.admin")

if TYPE_CHECKING:  # generic in the stubs only
    ModelAdmin = admin.ModelAdmin[Any]
    ModelForm = forms.ModelForm[StateRecord]
else:
    ModelAdmin = admin.ModelAdmin
    ModelForm = forms.ModelForm


class ReadOnly(ModelAdmin):
    """Rows the runners write: visible, never added or edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Runner)
class RunnerAdmin(ReadOnly):
    list_display = ("id", "kind", "host", "pid", "started_at", "last_seen", "stopping")
    list_filter = ("kind", "stopping")


@admin.register(Lease)
class LeaseAdmin(ReadOnly):
    list_display = ("name", "holder", "epoch", "acquired_at", "expires_at", "handoff_requested")
    search_fields = ("name",)
    actions = ("hand_off",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The action needs it; the form stays read-only (no field is editable).
        return obj is None and request.user.has_perm("cluster_singletons.change_lease")

    @admin.action(description="Hand off leadership", permissions=["change"])
    def hand_off(self, request: HttpRequest, queryset: QuerySet[Lease]) -> None:
        for lease in queryset:
            _hand_off(self, request, lease, lease.name)


def _hand_off(
    model_admin: ModelAdmin, request: HttpRequest, lease: Lease | None, name: str
) -> None:
    """Ask the leader of ``lease`` to hand off, and say so in the admin log and to the user."""
    if lease is None or not leases.request_handoff(lease.name, using=get_settings().database):
        model_admin.message_user(
            request, f"nobody leads {name}; nothing to hand off", messages.WARNING
        )
        return
    model_admin.log_change(request, lease, f"Requested a handoff from runner {lease.holder_id}")
    model_admin.message_user(request, f"handoff of {name} requested")


def _next_runs(cron: Schedule | None, now: datetime) -> list[datetime]:
    """The next three runs of a ``@cron`` function, for the dashboard (none if they cannot
    be computed: its health item says why)."""
    if cron is None or cron.timetable is None:
        return []
    try:
        return preview(cron.timetable, 3, after=now)
    except Exception:
        logger.exception("the next runs of %s cannot be computed", cron.key)
        return []


def _singleton_of(state_key: str) -> str:
    """The singleton a stored state key belongs to (the key itself if none does)."""
    return names.singleton_of(state_key, get_settings().key_prefix) or state_key


class StateForm(ModelForm):
    value = forms.CharField(widget=forms.Textarea(attrs={"rows": 12, "cols": 90}))
    note = forms.CharField(required=False, help_text="Why (kept with the old value in history).")

    class Meta:
        model = StateRecord
        fields = ("value",)

    def clean_value(self) -> str:
        name = _singleton_of(self.instance.key)
        try:
            store = control.singleton_store(name)
        except ClusterSingletonsError as exc:
            raise ValidationError(str(exc)) from exc
        try:
            store.model.model_validate_json(self.cleaned_data["value"])
        except ModelInvalid as exc:
            raise ValidationError(f"not a valid {store.model.__name__}: {exc}") from exc
        return str(self.cleaned_data["value"])


@admin.register(StateRecord)
class StateRecordAdmin(ModelAdmin):
    form = StateForm
    list_display = ("key", "status", "version", "schema_version", "updated_at", "updated_epoch")
    list_filter = ("status",)
    search_fields = ("key",)
    readonly_fields = ("key", "status", "problem", "version", "schema_version", "updated_at")
    actions = ("reset",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: StateRecord, form: Any, change: bool) -> None:
        name = _singleton_of(obj.key)
        note = form.cleaned_data.get("note") or f"edited in the admin by {request.user}"
        control.import_state(name, form.cleaned_data["value"], note)

    def delete_model(self, request: HttpRequest, obj: StateRecord) -> None:
        control.reset_state(_singleton_of(obj.key), f"deleted by {request.user}")

    @admin.action(
        description="Reset state (the old value is kept in history)", permissions=["delete"]
    )
    def reset(self, request: HttpRequest, queryset: QuerySet[StateRecord]) -> HttpResponse | None:
        if request.POST.get("confirmed") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "title": "Reset state?",
                "rows": list(queryset),
                "opts": self.model._meta,
            }
            return TemplateResponse(request, "admin/cluster_singletons/confirm_reset.html", context)
        for row in queryset:
            control.reset_state(_singleton_of(row.key), f"reset by {request.user}")
            self.log_change(request, row, "Reset the state (old value kept in history)")
            self.message_user(request, f"reset {row.key}")
        return None


@admin.register(StateHistory)
class StateHistoryAdmin(ReadOnly):
    list_display = ("key", "reason", "version", "schema_version", "recorded_at", "note")
    list_filter = ("reason",)
    search_fields = ("key",)


@admin.register(Run)
class RunAdmin(ReadOnly):
    list_display = ("schedule", "tick", "status", "kind", "ticks", "task", "published_at")
    list_filter = ("status", "kind")
    search_fields = ("schedule", "task_id")
    date_hierarchy = "tick"


@admin.register(ScheduleRecord)
class ScheduleRecordAdmin(ModelAdmin):
    list_display = ("key", "paused", "pause_note", "last_tick", "overlap", "problem")
    list_filter = ("paused",)
    search_fields = ("key",)
    fields = (
        "key",
        "paused",
        "pause_note",
        "skip_if_older_than",
        "overlap",
        "last_tick",
        "problem",
    )
    readonly_fields = ("key", "last_tick", "problem")
    actions = ("pause", "resume", "run_now")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(
        self, request: HttpRequest, obj: ScheduleRecord, form: Any, change: bool
    ) -> None:
        if obj.paused and not obj.pause_note:
            obj.pause_note = f"paused in the admin by {request.user}"
        super().save_model(request, obj, form, change)

    @admin.action(description="Pause (ticks pass without runs)", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[ScheduleRecord]) -> None:
        for record in queryset:
            control.set_paused(record.key, f"paused in the admin by {request.user}")
            self.log_change(request, record, "Paused")
        self.message_user(request, f"paused {queryset.count()} schedule(s)")

    @admin.action(description="Resume", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[ScheduleRecord]) -> None:
        for record in queryset:
            control.set_paused(record.key, None)
            self.log_change(request, record, "Resumed")
        self.message_user(request, f"resumed {queryset.count()} schedule(s)")

    @admin.action(description="Run now (recorded in the ledger as manual)", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[ScheduleRecord]) -> None:
        for record in queryset:
            try:
                run = control.run_now(record.key, note=f"run now by {request.user}")
            except ClusterSingletonsError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            self.log_change(request, record, f"Run now: ledger run {run.task_id}")
            self.message_user(request, f"{record.key}: manual run {run.task_id} recorded")


@admin.register(Delivery)
class DeliveryAdmin(ReadOnly):
    list_display = ("id", "task", "due_at", "status", "created_at", "done_at")
    list_filter = ("status",)
    search_fields = ("task",)
    actions = ("cancel",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and request.user.has_perm("cluster_singletons.change_delivery")

    @admin.action(description="Cancel (only pending deliveries)", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        from cluster_singletons.beat.deliveries import cancel

        for delivery in queryset:
            try:
                cancel(delivery.id, using=queryset.db)
            except DeliveryNotCancellable as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            self.log_change(request, delivery, "Cancelled")
            self.message_user(request, f"cancelled delivery {delivery.id}")


@admin.register(ClusterHealth)
class DashboardAdmin(ReadOnly):
    """The cluster health dashboard, with the hand-off operation per singleton."""

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if request.method == "POST":
            return self._operate(request)
        db = get_settings().database
        report = cluster_health()
        held = leases.by_name(using=db)
        schedules = {s.key: s for s in crons.registered()}
        now = datetime.now(UTC)
        rows = []
        for item in report.items:
            cron = schedules.get(item.name)
            rows.append({"item": item, "next_runs": _next_runs(cron, now)})
        by_holder: dict[int, list[str]] = {}
        for lease in held.values():
            if lease.holder_id is not None:
                by_holder.setdefault(lease.holder_id, []).append(lease.name)
        context = {
            **self.admin_site.each_context(request),
            "title": "Cluster health",
            "report": report,
            "rows": rows,
            "runners": [(r, sorted(by_holder.get(r.id, []))) for r in membership.rows(using=db)],
            "changes": leases.recent_changes(using=db),
            "can_hand_off": request.user.has_perm("cluster_singletons.change_lease"),
            "now": now,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/cluster_singletons/dashboard.html", context)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def _operate(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm("cluster_singletons.change_lease"):
            raise PermissionDenied
        name = request.POST.get("hand_off", "")
        settings = get_settings()
        lease = leases.by_name(using=settings.database).get(
            names.prefixed(name, settings.key_prefix)
        )
        _hand_off(self, request, lease, name)
        return HttpResponseRedirect(reverse("admin:cluster_singletons_clusterhealth_changelist"))


from cluster_singletons.tasks import admin_pages  # noqa: E402, F401  (registers its page)
