from __future__ import annotations

from django.apps import AppConfig
from django.core.signals import setting_changed
from django.utils.module_loading import autodiscover_modules

from cluster_singletons._installed import NAME


class ClusterSingletonsConfig(AppConfig):
    name = NAME
    verbose_name = "Cluster singletons"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Wiring only: checks register on import, the settings cache follows overrides,
        # each app's `singletons` module declares its singletons, tasks carry the context.
        from cluster_singletons import checks, conf, task_signals

        del checks
        setting_changed.connect(conf.reset_cache, dispatch_uid="cluster_singletons.conf")
        autodiscover_modules("singletons")
        task_signals.connect()
