"""``SnowflakeField``: a primary key defaulting to a new Snowflake id."""

from __future__ import annotations

import pytest
from django.db import connection, models
from django.test.utils import isolate_apps

from cluster_singletons.fields import SnowflakeField
from cluster_singletons.snowflake import default_generator, generate_id
from cluster_singletons.snowflake.value import Snowflake
from tests.snowflake.helpers import increasing


@pytest.mark.db
@pytest.mark.django_db(transaction=True)
@isolate_apps("cluster_singletons")
def test_snowflake_field_is_a_primary_key_defaulting_to_a_new_id() -> None:
    class Order(models.Model):
        id = SnowflakeField(primary_key=True)
        note = models.CharField(max_length=20, default="")

        class Meta:
            app_label = "cluster_singletons"

    assert SnowflakeField(primary_key=True).deconstruct()[3] == {"primary_key": True}
    assert SnowflakeField(editable=True).deconstruct()[3] == {"editable": True}
    assert not Order._meta.pk.editable  # type: ignore[union-attr]
    with connection.schema_editor() as editor:
        editor.create_model(Order)
    try:
        made = [Order.objects.create(note=str(n)) for n in range(3)]
        made += Order.objects.bulk_create([Order(note="bulk") for _ in range(3)])
        pks = [o.pk for o in made]
        assert increasing(pks)
        assert list(Order.objects.order_by("pk").values_list("pk", flat=True)) == pks
        assert {Snowflake(pk).machine_id for pk in pks} == {default_generator().machine_id}
        assert Order.objects.get(pk=Snowflake.parse(str(pks[0]))).note == "0"
        assert generate_id() > pks[-1]
    finally:
        default_generator().close()
        with connection.schema_editor() as editor:
            editor.delete_model(Order)
