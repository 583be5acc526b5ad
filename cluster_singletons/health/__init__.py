"""Health: is every singleton, ``@cron`` function and the beat making progress?

Holds the pure statuses (``status``), the cluster report that the probes, the
``cluster_status`` command and the admin dashboard show (``report``), and the
scrape-time Prometheus collector beside it (``collector``).

May import: everything below it (the leaves, ``cluster``, ``beat``, ``singletons``): it
reports on them all, and nothing but the Django surface (views, admin, commands)
imports it. Heartbeats are written by the leader work itself (``cluster.heartbeats``).
"""
