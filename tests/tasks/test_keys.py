"""A singleton task's key: from chosen arguments bound to the signature, or a callable."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_singletons.errors import TaskKeyInvalid
from cluster_singletons.tasks.keys import NAME_MAX, key_of

pytestmark = pytest.mark.unit


def report(user_id: int, day: str = "today", *, force: bool = False) -> None: ...


def _key(spec: Any, *args: Any, task: str = "app.report", prefix: str = "", **kwargs: Any) -> Any:
    return key_of(task, report, spec, args, kwargs, key_prefix=prefix)


def test_chosen_arguments_bind_to_the_signature_whether_passed_by_position_or_name() -> None:
    assert _key(("user_id",), 7) == _key(("user_id",), user_id=7, day="x", force=True)
    assert _key(("user_id",), 7) != _key(("user_id",), 8)
    assert json.loads(_key(("user_id", "day"), 7).value) == {"user_id": 7, "day": "today"}


def test_no_spec_keys_on_every_argument_and_an_empty_one_on_the_task_alone() -> None:
    assert _key(None, 7, force=True) != _key(None, 7)
    assert _key((), 7) == _key((), 8)
    assert _key((), 7) != _key((), 7, task="app.other")


def test_a_callable_key_gets_the_call_and_its_result_is_the_key() -> None:
    by_parity = _key(lambda user_id, **_: user_id % 2, 3)
    assert by_parity == _key(lambda user_id, **_: user_id % 2, 5)
    assert by_parity.value == "1"


def test_lease_names_are_namespaced_prefixed_and_fit_the_column() -> None:
    key = _key(("user_id",), 7, prefix="blue:")
    assert key.lease.startswith("blue:task:app.report:")
    long = _key(("user_id",), 7, task="x" * 500, prefix="p" * 64)
    assert len(long.lease) <= NAME_MAX
    assert long.lease != _key(("user_id",), 7, task="x" * 501, prefix="p" * 64).lease


@pytest.mark.parametrize(
    ("spec", "args", "problem"),
    [
        (lambda *a, **k: 1 / 0, (1,), "its key function raised ZeroDivisionError"),
        (lambda *a, **k: object(), (1,), "is not JSON-serialisable"),
        (lambda *a, **k: float("nan"), (1,), "is not JSON-serialisable"),
        (("user",), (1,), "singleton_key names no argument user"),
        ("user_id", (1,), "is a string, not a tuple of names"),
        (("user_id",), (), "its arguments do not fit its signature"),
        (None, ({1, 2},), "is not JSON-serialisable"),
    ],
)
def test_a_key_that_cannot_be_made_is_one_clear_error_naming_the_task(
    spec: Any, args: tuple[Any, ...], problem: str
) -> None:
    with pytest.raises(TaskKeyInvalid, match=problem) as caught:
        _key(spec, *args)
    assert "singleton task 'app.report'" in str(caught.value)
    assert caught.value.task == "app.report"


@given(st.dictionaries(st.text(), st.integers() | st.text() | st.none()), st.integers())
def test_equal_keys_are_equal_text_whatever_the_order(data: dict[str, Any], user: int) -> None:
    forwards = _key(lambda *a, **k: {"u": user, **data}, 1)
    backwards = _key(lambda *a, **k: dict(reversed([*{"u": user, **data}.items()])), 1)
    assert forwards == backwards
