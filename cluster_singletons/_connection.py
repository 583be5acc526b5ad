"""A thread's database connection after a database error: dropped if it no longer works.

Django gives each thread a connection of its own and replaces it only when told to: in a
web process its request signals do, in a background thread nothing does. A restart of the
database or of a pooler closes the connection under the process, and a loop that retries
on the same connection object then fails forever (``the connection is closed``). Every
loop of the package that retries after a database error calls ``drop_if_unusable`` on its
error path, so its next attempt connects afresh.
"""

from __future__ import annotations

import logging

from django.db import DatabaseError, connections

from cluster_singletons.errors import describe

logger = logging.getLogger("cluster_singletons")


def drop_if_unusable(using: str | None = None) -> None:
    """Close this thread's connection to ``using`` if it stopped working (or outlived
    ``CONN_MAX_AGE``), so that the next statement connects again; ``None``: each one this
    thread opened (the user code a loop runs may use aliases of its own).

    - A connection that still answers after the error is kept (Django asks it ``SELECT 1``).
    - Inside a transaction it is left alone: the transaction's owner rolls back first
      (Django drops a connection whose rollback fails), and a loop's next error outside
      the transaction drops it.
    """
    opened = connections.all(initialized_only=True)
    for connection in opened if using is None else [connections[using]]:
        if connection.in_atomic_block:
            continue
        try:
            connection.close_if_unusable_or_obsolete()
        except DatabaseError as exc:
            # Closing a socket the server already dropped may fail; the connection is gone
            # either way (Django forgets it), which is what was wanted.
            logger.debug("closing the broken connection to %r: %s", connection.alias, describe(exc))
