"""Cluster membership and leadership: who takes part, who leads what, and for how long.

Holds the runner registry (``membership``), the lease store (``leases``), fencing of a
leader's writes to its term (``fencing``), crash detection on PostgreSQL
(``crash_detection``), what leader work receives (``leadership``), where placed leases go
(``placement``), the coordinator's pure decisions (``decisions``) and the coordinator loop
that applies them (``coordinator``).

May import: the package's leaves (``errors``, ``conf``, ``clock``, ``pacing``, ``models``,
``names``, ``metrics``). Nothing here knows about the beat, singletons or Snowflake ids:
they are leader work the coordinator runs.
"""
