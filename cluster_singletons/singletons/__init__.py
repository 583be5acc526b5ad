"""Cluster singletons: functions that run on exactly one runner at a time, with durable state.

Holds the registry and the ``@singleton`` decorator (``registry``), the leader work that
drives one singleton (``driver``), what the function receives (``singleton_context``),
its resumable steps (``steps``), the typed state store (``state``) and state schema
versions (``state_versions``).

May import: the package's leaves and ``cluster`` (leadership, fencing, heartbeats).
"""
