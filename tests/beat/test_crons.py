"""``@cron``: declaring in-runner cron functions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from cluster_singletons.beat import crons
from cluster_singletons.errors import SingletonConfigError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    saved = dict(crons._crons)
    yield
    crons._crons.clear()
    crons._crons.update(saved)


def test_a_cron_is_registered_with_its_zone_and_options() -> None:
    @crons.cron("nightly", "0 3 * * *", tz="Europe/Berlin", overlap="skip", skip_if_older_than=60)
    def nightly(run: Any) -> None: ...

    (schedule,) = [s for s in crons.registered() if s.key == "cron:nightly"]
    assert schedule.fn is nightly and schedule.source == "cron"
    assert (schedule.overlap, schedule.skip_if_older_than) == ("skip", 60)
    assert schedule.first_tick_after(datetime(2026, 7, 1, tzinfo=UTC)) == datetime(
        2026, 7, 1, 1, 0, tzinfo=UTC
    ), "03:00 in Berlin is 01:00 UTC in summer"


@pytest.mark.parametrize(
    ("expression", "options", "message"),
    [
        ("0 3 * *", {}, "5 fields"),
        ("0 3 * * *", {"tz": "Mars/Olympus"}, "unknown time zone"),
        ("0 3 * * *", {"overlap": "sometimes"}, "overlap must be one of"),
    ],
)
def test_bad_declarations_fail_at_import_naming_the_cron(
    expression: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(SingletonConfigError, match=message) as caught:
        crons.cron("broken", expression, **options)
    assert "broken" in str(caught.value)


def test_a_name_taken_by_another_function_is_refused_and_the_same_one_may_come_again() -> None:
    def first(run: Any) -> None: ...

    def second(run: Any) -> None: ...

    crons.cron("twice", "* * * * *")(first)
    crons.cron("twice", "*/5 * * * *")(first)  # re-imported: replaced
    with pytest.raises(SingletonConfigError, match="cron registered twice"):
        crons.cron("twice", "* * * * *")(second)
