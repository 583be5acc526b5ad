"""The operator commands on singletons and the cluster: output, exit statuses, bad input."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from cluster_singletons.cluster import leases, membership
from cluster_singletons.models import Lease, StateHistory, StateRecord
from cluster_singletons.singletons.state import StateStore
from tests.conftest import Progress

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _call(*args: str, **kwargs: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO(), **kwargs)
    return out.getvalue()


def _exit_status(*args: str) -> int:
    with pytest.raises(SystemExit) as stopped:
        _call(*args)
    return int(stopped.value.code or 0)


@pytest.mark.usefixtures("progress")
def test_cluster_status_table_json_and_exit_status() -> None:
    assert _exit_status("cluster_status") == 1, "nobody leads 'progress': unhealthy"
    with pytest.raises(SystemExit):
        call_command("cluster_status", "--json", stdout=(out := StringIO()))
    body = json.loads(out.getvalue())
    assert body["status"] == "unhealthy"
    assert body["checks"][0]["name"] == "singleton:progress"
    assert body["checks"][0]["status"] == "not_led"


def test_cluster_status_says_how_each_runner_s_crash_is_detected() -> None:
    direct = membership.register(host="a", pid=1, kind="runcluster", using="default")
    pooled = membership.register(host="b", pid=2, kind="runcluster", using="default")
    membership.set_crash_detection(direct, lock=True, how="session", using="default")
    reason = "expiry: the connection goes through a pooler or proxy (...)"
    membership.set_crash_detection(pooled, lock=False, how=reason, using="default")
    with pytest.raises(SystemExit):
        call_command("cluster_status", stdout=(out := StringIO()))
    assert "crash detected by session" in out.getvalue()
    assert f"crash detected by {reason}" in out.getvalue()
    with pytest.raises(SystemExit):
        call_command("cluster_status", "--json", stdout=(out := StringIO()))
    runners = {r["id"]: r for r in json.loads(out.getvalue())["runners"]}
    assert runners[pooled]["crash_detection"] == reason


@pytest.mark.usefixtures("isolated_registry")
def test_cluster_status_and_the_metrics_show_each_runners_clock_offset() -> None:
    skewed, fine, unknown = (
        membership.register(host=host, pid=1, kind="beat", using="default")
        for host in ("skewed", "fine", "new")
    )
    membership.touch(skewed, clock_offset=-30.0123, using="default")
    membership.touch(fine, clock_offset=0.0004, using="default")
    table = _call("cluster_status")
    assert "skewed:1 live" in table and "clock -30.012 s (above clock_offset_warning)" in table
    assert "clock +0.000 s\n" in table and "clock offset unknown" in table
    body = json.loads(_call("cluster_status", "--json"))
    assert body["clock_offsets"] == {str(skewed): -30.0123, str(fine): 0.0004}
    assert [r["clock_offset"] for r in body["runners"]] == [-30.0123, 0.0004, None]
    scraped = Client().get("/cluster/metrics").content.decode()
    assert f'cluster_runner_clock_offset_seconds{{runner="{skewed}"}} -30.0123' in scraped
    assert f'runner="{unknown}"' not in scraped


def test_unknown_singletons_exit_2() -> None:
    for args in (
        ("singleton_reset", "nope", "--yes"),
        ("singleton_state", "show", "nope"),
        ("cluster_handoff", "nope"),
    ):
        with pytest.raises(CommandError, match="no singleton named 'nope'") as failed:
            _call(*args)
        assert failed.value.returncode == 2


def test_reset_asks_and_keeps_history(
    progress: StateStore[Progress], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert _exit_status("singleton_reset", "progress") == 1
    assert StateRecord.objects.filter(key="singleton:progress").exists(), "nothing changed"
    out = _call("singleton_reset", "progress", "--yes", "--note", "bad data")
    assert "is in history" in out
    assert not StateRecord.objects.filter(key="singleton:progress").exists()
    kept = StateHistory.objects.get(key="singleton:progress", reason="reset")
    assert (json.loads(kept.value), kept.note) == ({"cursor": 7}, "bad data")
    assert progress.load() == Progress()


@pytest.mark.usefixtures("progress")
def test_state_show_export_and_a_validated_import(tmp_path: Any) -> None:
    shown = json.loads(_call("singleton_state", "show", "progress"))
    assert (shown["version"], shown["value"]) == (1, {"cursor": 7})
    exported = json.loads(_call("singleton_state", "export", "progress"))
    assert exported == {"schema_version": 1, "value": {"cursor": 7}}
    bad = tmp_path / "bad.json"
    bad.write_text('{"cursor": "many"}')
    with pytest.raises(CommandError, match="refused, nothing was written"):
        _call("singleton_state", "import", "progress", str(bad))
    assert json.loads(StateRecord.objects.get().value) == {"cursor": 7}
    good = tmp_path / "good.json"
    good.write_text('{"cursor": 42}')
    _call("singleton_state", "import", "progress", str(good), "--note", "restore")
    row = StateRecord.objects.get()
    assert (json.loads(row.value), row.version) == ({"cursor": 42}, 2)
    assert StateHistory.objects.filter(reason="edit", note="restore").count() == 1


@pytest.mark.usefixtures("progress")
def test_handoff_is_refused_without_a_leader_and_ends_the_term_with_one() -> None:
    assert _exit_status("cluster_handoff", "progress") == 1
    leases.ensure(["singleton:progress"], using="default")
    runner = membership.register(host="h", pid=1, kind="runcluster", using="default")
    term = leases.acquire("singleton:progress", runner, ttl=30, using="default")
    assert term is not None
    assert "requested" in _call("cluster_handoff", "progress")
    assert Lease.objects.get(name="singleton:progress").handoff_requested
    assert leases.renew(runner, [term], ttl=30, using="default") == set(), "holder steps down"
    leases.release(runner, using="default", terms=[term])
    lease = Lease.objects.get(name="singleton:progress")
    assert (lease.handoff_requested, lease.handed_off_by) == (False, runner)
    # It goes to another runner: the one that handed it off stays away for a TTL.
    assert leases.acquire("singleton:progress", runner, ttl=30, using="default") is None
    other = membership.register(host="h2", pid=2, kind="runcluster", using="default")
    assert leases.takeable(
        ["singleton:progress"], runner_id=other, ttl=30, crash_detection=False, using="default"
    ).free == {"singleton:progress"}
    assert leases.acquire("singleton:progress", other, ttl=30, using="default") is not None
    assert Lease.objects.get(name="singleton:progress").handed_off_by is None


@pytest.mark.usefixtures("progress")
def test_state_show_prints_the_value_as_json_not_a_string_of_it() -> None:
    shown = json.loads(_call("singleton_state", "show", "progress"))
    assert shown["value"] == {"cursor": 7}
    StateRecord.objects.update(value="{damaged")
    shown = json.loads(_call("singleton_state", "show", "progress"))
    assert shown["value"] == "{damaged", "a row that does not parse is shown as it is"


@pytest.mark.usefixtures("progress")
def test_a_missing_import_file_and_no_terminal_are_one_line_errors(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(CommandError, match=r"cannot read .*nope\.json"):
        _call("singleton_state", "import", "progress", str(missing))

    def no_terminal(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", no_terminal)
    with pytest.raises(CommandError, match="--yes"):
        _call("singleton_reset", "progress")
    assert StateRecord.objects.filter(key="singleton:progress").exists(), "nothing changed"
