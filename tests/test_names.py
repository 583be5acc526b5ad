"""Shared names: lease names and state keys under a key prefix."""

from __future__ import annotations

import pytest

from cluster_singletons import names

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("prefix", ["", "app1:", "singleton:"])
def test_a_singletons_stored_key_leads_back_to_it_under_any_prefix(prefix: str) -> None:
    stored = names.prefixed(names.singleton_lease("report"), prefix)
    assert names.singleton_of(stored, prefix) == "report"


def test_keys_that_are_not_a_singletons_under_this_prefix_name_none() -> None:
    assert names.singleton_of("beat", "") is None
    assert names.singleton_of("singleton:report", "app1:") is None
    assert names.singleton_of("app2:singleton:report", "app1:") is None
    assert names.singleton_of("counter", "") is None


def test_the_overlap_choices_are_the_policies() -> None:
    assert [value for value, _ in names.OVERLAP_CHOICES] == list(names.OVERLAPS)
