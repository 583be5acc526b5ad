"""State export and import: the schema version travels with the value; import decodes it
through the model's upgrades and refuses what it cannot read (nothing is written)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from io import StringIO
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from pydantic import BaseModel

from cluster_singletons.models import StateRecord
from cluster_singletons.singletons import registry
from cluster_singletons.singletons.state_versions import Upgrade

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _v1_to_v2(old: dict[str, Any]) -> dict[str, Any]:
    return {"position": old["cursor"], "done": 0}


class Cursor(BaseModel):
    """Version 2 of the ``cursor`` singleton's state; version 1 was ``{"cursor": n}``."""

    schema_version: ClassVar[int] = 2
    upgrades: ClassVar[Mapping[int, Upgrade]] = {1: _v1_to_v2}
    position: int = 0
    done: int = 0


@pytest.fixture
def v1_row(isolated_registry: None) -> Iterator[None]:
    """Singleton ``cursor`` declared at version 2, a version-1 value stored."""
    registry.singleton("cursor", state=Cursor, interval=10)(lambda ctx: None)
    StateRecord.objects.create(key="singleton:cursor", value='{"cursor": 41}', schema_version=1)
    yield


def _call(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _stored() -> tuple[dict[str, Any], int]:
    row = StateRecord.objects.get(key="singleton:cursor")
    return json.loads(row.value), row.schema_version


@pytest.mark.usefixtures("v1_row")
def test_an_exported_older_version_imports_through_the_upgrades(tmp_path: Path) -> None:
    exported = json.loads(_call("singleton_state", "export", "cursor"))
    assert exported == {"schema_version": 1, "value": {"cursor": 41}}
    StateRecord.objects.all().delete()
    path = tmp_path / "cursor.json"
    path.write_text(json.dumps(exported))
    _call("singleton_state", "import", "cursor", str(path))
    assert _stored() == ({"position": 41, "done": 0}, 2), "upgraded, not reset to defaults"


@pytest.mark.usefixtures("v1_row")
@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"schema_version": 3, "value": {"position": 1}}', "newer than Cursor's 2"),
        ('{"schema_version": 2, "value": {"position": 1, "color": "red"}}', "color"),
        ('{"position": 1, "colour": "red"}', "colour"),
        ('{"schema_version": 1, "value": {"cursor": 1}, "note": "x"}', "'note'"),
        ('{"schema_version": 1, "value": {"position": 1}}', "upgrade from version 1 failed"),
    ],
)
def test_import_refuses_a_newer_version_and_unknown_fields(
    tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(CommandError, match="refused, nothing was written") as refused:
        _call("singleton_state", "import", "cursor", str(path))
    assert why in str(refused.value)
    assert _stored() == ({"cursor": 41}, 1)


@pytest.mark.usefixtures("v1_row")
def test_the_admin_form_refuses_unknown_fields_and_reads_the_row_s_version() -> None:
    user = User.objects.create_user("editor", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    url = f"/admin/cluster_singletons/staterecord/{quote('singleton:cursor')}/change/"
    assert client.post(url, {"value": '{"cursor": 5}'}).status_code == 302
    assert _stored() == ({"position": 5, "done": 0}, 2), "the row's version 1, upgraded"
    refused = client.post(url, {"value": '{"position": 6, "colour": "red"}'})
    assert refused.status_code == 200 and "colour" in refused.content.decode()
    assert _stored() == ({"position": 5, "done": 0}, 2)
