"""Singleton Celery tasks: at most one run per (task, key) across the cluster.

Holds the key a call is run under (``keys``), this process's holder of task keys: its
registration, crash detection and the thread renewing its keys (``holder``), what the
running task receives as ``self.cluster_lock`` (``lock``), and the task base class that
takes the key before the body runs and releases it however the body ends (``task``);
the enqueue-time policy (``enqueue``) over the claims of queued and running runs
(``claims``), and what operators do to held keys (``operations``).

May import: the package's leaves and ``cluster`` (membership, leases, fencing, crash
detection). The guarantee lives in the worker, not in ``apply_async``: beat, ``send_task``
and retries all reach it.
"""
