"""``SnowflakeField``: a ``BigIntegerField`` whose default is a new Snowflake id."""

from __future__ import annotations

from typing import Any

from django.db import models

from cluster_singletons.snowflake import generate_id


class SnowflakeField(models.BigIntegerField):  # type: ignore[type-arg]
    """A 64-bit, time-sortable id, usable as a primary key: ``SnowflakeField(primary_key=True)``.

    Each new instance gets ``generate_id()`` (ids of one process strictly increase, ids
    of different processes never collide); it is not editable in forms unless
    ``editable=True``. Values are plain ``int``; wrap one in
    ``Snowflake`` to read its time, machine id and sequence. Send them to JavaScript as
    strings (``str(pk)``): its numbers hold only 53 bits.
    """

    description = "Snowflake id (64-bit, time-sortable)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default", generate_id)
        kwargs.setdefault("editable", False)  # generated, like an AutoField
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        # Both are implied by the field: keep them out of migrations.
        if kwargs.get("default") is generate_id:
            del kwargs["default"]
        if kwargs.get("editable") is False:
            del kwargs["editable"]
        else:
            kwargs["editable"] = True
        return name, path, args, kwargs
