"""The singleton registry: declaring, refusing bad declarations, discovering apps' modules."""

from __future__ import annotations

from typing import Any

import pytest

from cluster_singletons.errors import SingletonConfigError
from cluster_singletons.singletons import registry
from tests.singletons.helpers import declare

pytestmark = [
    pytest.mark.db,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fast_retries"),
]


def test_a_name_registered_twice_by_different_functions_is_refused(declared: list[str]) -> None:
    @declare(declared, "twice")
    def first(ctx: Any) -> None: ...

    with pytest.raises(SingletonConfigError, match="registered twice") as caught:

        @registry.singleton("twice")
        def second(ctx: Any) -> None: ...

    assert "'twice'" in str(caught.value) and "first" in str(caught.value)


def test_a_state_that_is_not_a_pydantic_model_is_refused_naming_the_singleton() -> None:
    with pytest.raises(SingletonConfigError, match=r"'reports'.*pydantic"):
        registry.singleton("reports", state=dict)  # type: ignore[arg-type]


def test_app_singletons_modules_are_discovered() -> None:
    assert {"indexer", "rates"} <= set(registry.registered())
