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
from collections.abc import Callable

from django.db import DatabaseError, InterfaceError, connections

from cluster_singletons.errors import describe
from cluster_singletons.pacing import Backoff

logger = logging.getLogger("cluster_singletons")

DATABASE_ERRORS = (DatabaseError, InterfaceError)


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


class Attempts:
    """The database attempts of one loop (a runner's coordinator): an error is logged in
    one line naming ``who()``, paced by the capped ``backoff`` (reset by a success), and
    drops the connection if it broke, so the next attempt connects again."""

    def __init__(
        self,
        backoff: Backoff,
        *,
        using: str,
        who: Callable[[], object],
        log: logging.Logger = logger,
    ) -> None:
        self.backoff, self.using, self._who, self.log = backoff, using, who, log

    def attempt(self, what: str) -> Attempt:
        return Attempt(self, what)


class Attempt:
    """Context manager for one attempt: database errors are caught (``failed``, and
    ``delay`` before the next try); any other exception propagates."""

    def __init__(self, attempts: Attempts, what: str) -> None:
        self.attempts, self.what = attempts, what
        self.failed = False
        self.delay = 0.0

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        attempts = self.attempts
        if exc is None:
            attempts.backoff = attempts.backoff.reset()
            return False
        if not isinstance(exc, DATABASE_ERRORS):
            return False
        self.failed, self.delay = True, attempts.backoff.delay
        attempts.log.warning(
            "runner %s: %s failed (%s); retrying in %.1fs",
            attempts._who(),
            self.what,
            describe(exc),
            self.delay,
        )
        attempts.backoff = attempts.backoff.failed()
        drop_if_unusable(attempts.using)
        return True
