"""An app of the example project whose tasks only Celery's autodiscovery imports."""
