"""The exceptions this package raises; all share one root."""

from __future__ import annotations


class ClusterSingletonsError(Exception):
    """Root of every error raised by cluster_singletons."""


class LeadershipLost(ClusterSingletonsError):
    """A fenced write found that the lease is no longer held by this runner and epoch.

    The caller is a deposed leader: it must stop acting as leader. Nothing it tried to
    write in the fenced transaction was committed.
    """

    def __init__(self, lease: str, runner_id: int, epoch: int) -> None:
        self.lease = lease
        self.runner_id = runner_id
        self.epoch = epoch
        super().__init__(
            f"runner {runner_id} no longer holds lease {lease!r} at epoch {epoch}; "
            "stop acting as its leader (the write was not committed)"
        )


class DatabaseUnavailable(ClusterSingletonsError):
    """The database stayed unreachable for longer than the configured bound."""

    def __init__(self, waited: float, cause: BaseException) -> None:
        self.waited = waited
        self.cause = cause
        super().__init__(
            f"database unreachable for {waited:.1f}s (last error: {_one_line(cause)}); "
            "check DATABASES and that the server is up, or raise "
            "CLUSTER_SINGLETONS['startup_timeout']"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def describe(exc: BaseException) -> str:
    """One line naming an exception, for logs that must not carry a traceback."""
    return _one_line(exc)
