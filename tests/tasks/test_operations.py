"""cluster_task_keys: list the task keys held now, force-release one (confirmed, logged)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from cluster_singletons.conf import get_settings
from cluster_singletons.models import Lease
from cluster_singletons.tasks.holder import Holder
from cluster_singletons.tasks.lock import ClusterLock
from project.demo.tasks import exclusive_skip

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _call(*args: str, **kwargs: Any) -> str:
    out = StringIO()
    call_command("cluster_task_keys", *args, stdout=out, stderr=StringIO(), **kwargs)
    return out.getvalue()


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Holder, ClusterLock]]:
    holder = Holder(get_settings())
    key = exclusive_skip.singleton_key_of(("k", 0.0, str(tmp_path / "e")), {})
    lock = holder.acquire(key, task_id="t-1")
    assert lock is not None
    yield holder, lock
    holder.release(lock)
    holder.close()


def test_list_shows_each_held_key_with_its_holder_and_epoch(
    held: tuple[Holder, ClusterLock],
) -> None:
    holder, lock = held
    text = _call("list")
    assert (
        lock.lease in text
        and f"epoch {lock.epoch}" in text
        and f"runner {holder.runner_id}" in text
    )
    (row,) = json.loads(_call("list", "--json"))
    assert (row["lease"], row["epoch"], row["holder"]) == (lock.lease, lock.epoch, holder.runner_id)


def test_release_frees_the_key_logs_it_and_the_holder_finds_it_lost(
    held: tuple[Holder, ClusterLock], caplog: pytest.LogCaptureFixture
) -> None:
    holder, lock = held
    with caplog.at_level(logging.WARNING, logger="cluster_singletons.tasks"):
        assert "released" in _call("release", lock.lease, "--yes")
    assert Lease.objects.filter(name=lock.lease, holder__isnull=True).exists()
    assert any("force-released task key" in r.getMessage() for r in caplog.records)
    holder.renew()
    assert lock.lost
    assert _call("list") == "no task key is held\n"


def test_release_asks_and_a_no_changes_nothing(
    held: tuple[Holder, ClusterLock], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, lock = held
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(SystemExit):
        _call("release", lock.lease)
    assert Lease.objects.get(name=lock.lease).holder_id == lock.term.runner_id


def test_releasing_a_key_nobody_holds_exits_1_and_no_name_exits_2() -> None:
    with pytest.raises(CommandError, match="is not held") as caught:
        _call("release", "task:nope:0", "--yes")
    assert caught.value.returncode == 1
    with pytest.raises(CommandError) as missing:
        _call("release")
    assert missing.value.returncode == 2


def test_the_admin_page_lists_held_task_keys_for_users_who_may_view_leases(
    held: tuple[Holder, ClusterLock],
) -> None:
    from django.contrib.auth.models import Permission, User
    from django.test import Client

    _, lock = held
    url = "/admin/cluster_singletons/heldtaskkey/"
    user = User.objects.create_user("viewer", is_staff=True)
    client = Client()
    client.force_login(user)
    assert client.get(url).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_lease"))
    page = client.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "demo.exclusive_skip" in text and lock.lease in text
    assert str(lock.epoch) in text
