from __future__ import annotations

from django.apps import AppConfig
from django.core.signals import setting_changed


class ClusterSingletonsConfig(AppConfig):
    name = "cluster_singletons"
    verbose_name = "Cluster singletons"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Wiring only: checks register on import, the settings cache follows overrides.
        from cluster_singletons import checks, conf

        del checks
        setting_changed.connect(conf.reset_cache, dispatch_uid="cluster_singletons.conf")
