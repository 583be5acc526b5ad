"""The admin: dashboard, pages, operations behind permissions, written to the admin log."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings

from cluster_singletons.cluster import leases, membership
from cluster_singletons.models import (
    Delivery,
    Lease,
    Run,
    Runner,
    ScheduleRecord,
    StateHistory,
    StateRecord,
)
from cluster_singletons.singletons.state import StateStore
from tests.conftest import Progress

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _led(progress: StateStore[Progress]) -> None:
    """``progress`` is led by a runner on node-a."""
    leases.ensure(["singleton:progress"], using="default")
    runner = membership.register(host="node-a", pid=4242, kind="runcluster", using="default")
    leases.acquire("singleton:progress", runner, ttl=60, using="default")


def _client(*perms: str, superuser: bool = False) -> Client:
    user = User.objects.create_user(f"u{User.objects.count()}", is_staff=True)
    user.is_superuser = superuser
    user.save()
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


def test_dashboard_shows_each_singleton_and_runner() -> None:
    page = _client().get("/admin/cluster_singletons/clusterhealth/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-name="singleton:progress"' in html
    assert "cs-never_executed" in html, "led, no heartbeat yet, within the grace period"
    assert "node-a:4242" in html
    assert "Hand off" not in html, "no change_lease permission, no button"


def test_anonymous_and_non_staff_get_nothing() -> None:
    assert Client().get("/admin/cluster_singletons/clusterhealth/").status_code == 302
    plain = User.objects.create_user("plain")
    client = Client()
    client.force_login(plain)
    assert client.get("/admin/cluster_singletons/clusterhealth/").status_code == 302
    response = client.post(
        "/admin/cluster_singletons/clusterhealth/", {"hand_off": "singleton:progress"}
    )
    assert response.status_code == 302 and not Lease.objects.get().handoff_requested


def test_hand_off_needs_the_permission_and_is_logged() -> None:
    url = "/admin/cluster_singletons/clusterhealth/"
    assert _client().post(url, {"hand_off": "singleton:progress"}).status_code == 403
    assert not Lease.objects.get(name="singleton:progress").handoff_requested
    operator = _client("change_lease")
    assert "Hand off" in operator.get(url).content.decode()
    operator.post(url, {"hand_off": "singleton:progress"})
    assert Lease.objects.get(name="singleton:progress").handoff_requested
    assert LogEntry.objects.get().change_message.startswith("Requested a handoff from runner")


def test_state_edit_is_validated_and_keeps_history() -> None:
    url = "/admin/cluster_singletons/staterecord/singleton:progress/change/"
    viewer = _client("view_staterecord")
    assert viewer.post(url, {"value": '{"cursor": 9}'}).status_code == 403
    editor = _client("view_staterecord", "change_staterecord")
    refused = editor.post(url, {"value": '{"cursor": "lots"}'})
    assert refused.status_code == 200 and "not a valid Progress" in refused.content.decode()
    assert json.loads(StateRecord.objects.get().value) == {"cursor": 7}
    assert editor.post(url, {"value": '{"cursor": 9}', "note": "fix"}).status_code == 302
    assert json.loads(StateRecord.objects.get().value) == {"cursor": 9}
    assert StateHistory.objects.get(reason="edit").note == "fix"
    assert LogEntry.objects.count() == 1


def test_reset_pause_resume_and_run_now_actions() -> None:
    changelist = "/admin/cluster_singletons/staterecord/"
    action = {"action": "reset", "_selected_action": ["singleton:progress"]}
    _client("view_staterecord").post(changelist, action)
    assert StateRecord.objects.exists(), "no delete permission: the action is not offered"
    operator = _client("view_staterecord", "delete_staterecord")
    asked = operator.post(changelist, action)
    assert asked.status_code == 200 and "Yes, reset" in asked.content.decode()
    assert StateRecord.objects.exists(), "nothing happens before confirmation"
    operator.post(changelist, {**action, "confirmed": "yes"})
    assert not StateRecord.objects.exists()
    assert StateHistory.objects.filter(reason="reset").count() == 1

    ScheduleRecord.objects.create(key="beat:nightly")
    schedules_url = "/admin/cluster_singletons/schedulerecord/"
    pause = {"action": "pause", "_selected_action": ["beat:nightly"]}
    _client("view_schedulerecord").post(schedules_url, pause)
    assert not ScheduleRecord.objects.get().paused
    operator = _client("view_schedulerecord", "change_schedulerecord")
    operator.post(schedules_url, pause)
    record = ScheduleRecord.objects.get()
    assert record.paused and record.pause_note.startswith("paused in the admin by")
    operator.post(schedules_url, {"action": "resume", "_selected_action": ["beat:nightly"]})
    assert not ScheduleRecord.objects.get().paused
    assert LogEntry.objects.filter(change_message__in=["Paused", "Resumed"]).count() == 2


def test_run_now_cancel_and_lease_hand_off_actions_need_their_permissions(
    settings: Any,
) -> None:
    from celery import current_app

    current_app.conf.beat_schedule = {"ping": {"task": "demo.ping", "schedule": 3600}}
    try:
        ScheduleRecord.objects.create(key="beat:ping")
        run_now = {"action": "run_now", "_selected_action": ["beat:ping"]}
        url = "/admin/cluster_singletons/schedulerecord/"
        _client("view_schedulerecord").post(url, run_now)
        assert not Run.objects.exists()
        _client("view_schedulerecord", "change_schedulerecord").post(url, run_now)
        assert Run.objects.get().kind == Run.Kind.MANUAL
    finally:
        current_app.conf.beat_schedule = {}

    delivery = Delivery.objects.create(
        id=1, task="demo.ping", message="{}", due_at=datetime.now(UTC) + timedelta(hours=1)
    )
    cancel = {"action": "cancel", "_selected_action": [str(delivery.id)]}
    _client("view_delivery").post("/admin/cluster_singletons/delivery/", cancel)
    assert Delivery.objects.get().status == Delivery.Status.PENDING
    _client("view_delivery", "change_delivery").post("/admin/cluster_singletons/delivery/", cancel)
    assert Delivery.objects.get().status == Delivery.Status.CANCELLED

    hand_off = {"action": "hand_off", "_selected_action": ["singleton:progress"]}
    _client("view_lease").post("/admin/cluster_singletons/lease/", hand_off)
    assert not Lease.objects.get(name="singleton:progress").handoff_requested
    _client("view_lease", "change_lease").post("/admin/cluster_singletons/lease/", hand_off)
    assert Lease.objects.get(name="singleton:progress").handoff_requested
    assert LogEntry.objects.count() == 3


def test_state_edits_find_their_singleton_under_a_key_prefix() -> None:
    with override_settings(CLUSTER_SINGLETONS={"key_prefix": "app1:"}):
        store = StateStore("singleton:progress", Progress)
        store.load()
        store.save(Progress(cursor=3))
        assert store.key == "app1:singleton:progress"
        url = f"/admin/cluster_singletons/staterecord/{quote(store.key)}/change/"
        editor = _client("view_staterecord", "change_staterecord")
        assert editor.post(url, {"value": '{"cursor": 4}'}).status_code == 302
        assert json.loads(StateRecord.objects.get(key=store.key).value) == {"cursor": 4}


def test_deleting_state_in_the_admin_resets_it_and_keeps_history() -> None:
    StateRecord.objects.filter(key="singleton:progress").update(
        status=StateRecord.Status.QUARANTINED, problem="bad"
    )
    operator = _client("view_staterecord", "delete_staterecord")
    changelist = "/admin/cluster_singletons/staterecord/"
    delete = {"action": "delete_selected", "_selected_action": ["singleton:progress"]}
    operator.post(changelist, {**delete, "post": "yes"})
    assert not StateRecord.objects.exists()
    kept = StateHistory.objects.get(reason="reset")
    assert json.loads(kept.value) == {"cursor": 7}
    StateStore("singleton:progress", Progress).save(Progress(cursor=8))
    url = f"/admin/cluster_singletons/staterecord/{quote('singleton:progress')}/delete/"
    assert operator.post(url, {"post": "yes"}).status_code == 302
    assert not StateRecord.objects.exists()
    assert StateHistory.objects.filter(reason="reset").count() == 2


def test_schedule_records_cannot_be_deleted_from_the_admin() -> None:
    ScheduleRecord.objects.create(key="beat:nightly", paused=True, pause_note="why")
    superuser = _client(superuser=True)
    url = "/admin/cluster_singletons/schedulerecord/"
    delete = {"action": "delete_selected", "_selected_action": ["beat:nightly"], "post": "yes"}
    superuser.post(url, delete)
    assert (
        superuser.post(f"{url}{quote('beat:nightly')}/delete/", {"post": "yes"}).status_code == 403
    )
    record = ScheduleRecord.objects.get()
    assert record.paused and record.pause_note == "why"


def test_the_ledger_page_shows_times_to_the_millisecond() -> None:
    tick = datetime(2026, 6, 1, 12, 0, 5, 250_000, tzinfo=UTC)
    Run.objects.create(schedule="beat:fast", tick=tick, published_at=tick + timedelta(seconds=0.5))
    html = _client(superuser=True).get("/admin/cluster_singletons/run/").content.decode()
    assert "2026-06-01 12:00:05.250" in html
    assert "2026-06-01 12:00:05.750" in html


def test_dashboard_names_are_data_attributes_not_inline_javascript(
    isolated_registry: None,
) -> None:
    from cluster_singletons.singletons import registry

    registry.singleton("it's", interval=10)(lambda ctx: None)
    leases.ensure(["singleton:it's"], using="default")
    leases.acquire("singleton:it's", Runner.objects.get().id, ttl=60, using="default")
    html = _client("change_lease").get("/admin/cluster_singletons/clusterhealth/").content.decode()
    assert "onclick" not in html
    assert 'data-confirm="Hand singleton:it&#x27;s off to another runner?"' in html


def test_under_a_key_prefix_the_admin_shows_and_changes_only_its_own_rows() -> None:
    with override_settings(CLUSTER_SINGLETONS={"key_prefix": "app1:"}):
        ours = StateStore("singleton:progress", Progress)
        ours.save(Progress(cursor=1))
    for prefix in ("", "app1:", "app2:"):
        Run.objects.create(schedule=f"{prefix}beat:five", tick=datetime(2026, 1, 1, tzinfo=UTC))
        ScheduleRecord.objects.create(key=f"{prefix}beat:five")
    StateRecord.objects.create(key="app2:singleton:progress", value='{"cursor": 3}')
    operator = _client(superuser=True)
    with override_settings(CLUSTER_SINGLETONS={"key_prefix": "app1:"}):
        states = operator.get("/admin/cluster_singletons/staterecord/").content.decode()
        assert "app1:singleton:progress" in states and "app2:" not in states
        assert ">singleton:progress<" not in states
        runs = operator.get("/admin/cluster_singletons/run/").content.decode()
        assert "app1:beat:five" in runs and "app2:" not in runs and ">beat:five<" not in runs
        foreign = (
            f"/admin/cluster_singletons/staterecord/{quote('app2:singleton:progress')}/change/"
        )
        assert operator.post(foreign, {"value": '{"cursor": 9}'}).status_code == 302
        assert json.loads(StateRecord.objects.get(key="app2:singleton:progress").value) == {
            "cursor": 3
        }, "another deployment's row is not ours to edit"
        reset = {
            "action": "reset",
            "_selected_action": ["app1:singleton:progress", "app2:singleton:progress"],
            "confirmed": "yes",
        }
        assert operator.post("/admin/cluster_singletons/staterecord/", reset).status_code == 302
        assert not StateRecord.objects.filter(key="app1:singleton:progress").exists()
        assert StateRecord.objects.filter(key="app2:singleton:progress").exists()
        assert StateRecord.objects.filter(key="singleton:progress").exists()
        pause = {"action": "pause", "_selected_action": ["app1:beat:five", "app2:beat:five"]}
        operator.post("/admin/cluster_singletons/schedulerecord/", pause)
    assert set(ScheduleRecord.objects.filter(paused=True).values_list("key", flat=True)) == {
        "app1:beat:five"
    }
    with override_settings(CLUSTER_SINGLETONS={"key_prefix": "app1:"}):
        other = membership.register(host="node-b", pid=1, kind="runcluster", using="default")
        leases.ensure(["app1:singleton:progress"], using="default")
        leases.acquire("app1:singleton:progress", other, ttl=60, using="default")
        dashboard = operator.get("/admin/cluster_singletons/clusterhealth/").content.decode()
        assert "app1:singleton:progress" in dashboard and "node-b:1" in dashboard
        assert "node-a" not in dashboard, "the unprefixed deployment's runner"
        node_a = Runner.objects.get(host="node-a").id
        assert f"runner {node_a}<" not in dashboard, "nor its lease changes"
    operator.get("/admin/")  # shows the messages of the operations above
    unprefixed = operator.get("/admin/cluster_singletons/staterecord/").content.decode()
    assert "app2:" not in unprefixed and "app1:" not in unprefixed
    assert "app2:" not in operator.get("/admin/cluster_singletons/schedulerecord/").content.decode()
