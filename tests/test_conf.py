"""Settings validation and the system checks that report bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from cluster_singletons.checks import check_settings, sqlite_warnings
from cluster_singletons.conf import ClusterSettings, get_settings
from tests.fresh_interpreter import ROOT

pytestmark = pytest.mark.unit


def _ids(setting: object) -> list[str]:
    with override_settings(CLUSTER_SINGLETONS=setting):
        return [message.id or "" for message in check_settings()]


def test_defaults_pass_the_checks_and_renew_within_a_third_of_the_ttl() -> None:
    defaults = ClusterSettings()
    assert defaults.renew_interval <= defaults.lease_ttl / 3
    assert _ids({}) == []


def test_settings_are_frozen() -> None:
    with pytest.raises(ValueError):
        get_settings().lease_ttl = 1  # type: ignore[misc]


def test_settings_follow_override_settings() -> None:
    with override_settings(CLUSTER_SINGLETONS={"lease_ttl": 42, "renew_interval": 5}):
        assert get_settings().lease_ttl == 42
    assert get_settings().lease_ttl == ClusterSettings().lease_ttl


def test_not_a_dict_is_e001() -> None:
    assert _ids(["lease_ttl", 3]) == ["cluster_singletons.E001"]


def test_bad_value_is_e002_naming_the_key_with_a_hint_but_not_the_value() -> None:
    with override_settings(CLUSTER_SINGLETONS={"lease_ttl": -1.25}):
        [error] = check_settings()
    assert error.id == "cluster_singletons.E002"
    assert "'lease_ttl'" in error.msg and "greater than 0" in error.msg
    assert "-1.25" not in error.msg, "values are never echoed (one may be a secret)"
    assert error.hint and "lease_ttl" in error.hint


def test_unknown_key_is_e002_suggesting_the_nearest_key() -> None:
    with override_settings(CLUSTER_SINGLETONS={"lease_tll": 5}):
        [error] = check_settings()
    assert error.id == "cluster_singletons.E002"
    said = "CLUSTER_SINGLETONS['lease_tll'] is not a setting (did you mean 'lease_ttl'?)"
    assert error.msg == said
    assert error.hint and "lease_ttl" in error.hint


def test_a_mistyped_secret_key_is_named_never_its_value() -> None:
    bad = {"helth_token": "s3cret-value", "lease_ttl": "s3cret-too", "zzzz": 1}
    with override_settings(CLUSTER_SINGLETONS=bad):
        messages = check_settings()
        with pytest.raises(ImproperlyConfigured) as raised:
            get_settings()
    text = str(raised.value)
    assert "\n" not in text, "one line"
    assert "['helth_token'] is not a setting (did you mean 'health_token'?)" in text
    assert "['zzzz'] is not a setting" in text and "['zzzz'] is not a setting (did" not in text
    assert "['lease_ttl']: Input should be a valid number" in text
    for shown in [text, *(f"{m.msg} {m.hint}" for m in messages)]:
        assert "s3cret" not in shown


def test_renew_interval_above_a_third_of_ttl_is_e003_with_the_bound_in_the_hint() -> None:
    with override_settings(CLUSTER_SINGLETONS={"lease_ttl": 9, "renew_interval": 4}):
        [error] = check_settings()
    assert error.id == "cluster_singletons.E003"
    assert error.hint and "at most 3s" in error.hint


def test_unknown_database_alias_is_e004() -> None:
    assert _ids({"database": "nope"}) == ["cluster_singletons.E004"]


def test_backoff_start_above_its_cap_is_w003() -> None:
    assert _ids({"retry_backoff": 20, "retry_backoff_max": 5}) == ["cluster_singletons.W003"]


def test_sqlite_without_immediate_transactions_or_wal_warns() -> None:
    db = {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.sqlite3", "OPTIONS": {}}
    ids = [m.id for m in sqlite_warnings("default", db)]
    assert ids == ["cluster_singletons.W001", "cluster_singletons.W002"]


def test_example_project_sqlite_settings_pass() -> None:
    from pathlib import Path

    from project.settings import sqlite_database

    assert sqlite_warnings("x", sqlite_database(Path("x.sqlite3"))) == []


def test_invalid_settings_raise_improperly_configured_at_use_not_import() -> None:
    with (
        override_settings(CLUSTER_SINGLETONS={"crash_detection": "sometimes"}),
        pytest.raises(ImproperlyConfigured, match="crash_detection"),
    ):
        get_settings()


@pytest.mark.parametrize(("env", "debug"), [(None, False), ("0", False), ("1", True)])
def test_example_project_runs_with_debug_off_unless_asked(env: str | None, debug: bool) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "DJANGO_DEBUG"}
    if env is not None:
        environ["DJANGO_DEBUG"] = env
    code = "import project.settings as s; print(s.DEBUG)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(debug)


@pytest.mark.parametrize("prefix", ["beat:", "periodic:x", "singleton:", "cron:", "delivery:"])
def test_a_key_prefix_that_reads_as_a_key_is_e002(prefix: str) -> None:
    with override_settings(CLUSTER_SINGLETONS={"key_prefix": prefix}):
        [error] = check_settings()
    assert error.id == "cluster_singletons.E002" and "key_prefix" in error.msg
