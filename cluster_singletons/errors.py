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


class SingletonConfigError(ClusterSingletonsError):
    """A singleton or its state model is declared wrongly; raised at import/startup."""

    def __init__(self, singleton: str, problem: str) -> None:
        self.singleton = singleton
        super().__init__(f"singleton {singleton!r}: {problem}")


class SingletonError(ClusterSingletonsError):
    """A failure of one singleton, with one of five reasons.

    ``StateLoadFailed`` and ``StatePersistFailed`` are retryable: the runner backs off and
    calls the singleton again. ``SchemaDecodeFailed`` stops the singleton until an operator
    repairs or resets its state. ``HeartbeatFailed`` and ``LeaderHandoffFailed`` are reported.
    """

    REASONS = (
        "StateLoadFailed",
        "StatePersistFailed",
        "SchemaDecodeFailed",
        "HeartbeatFailed",
        "LeaderHandoffFailed",
    )
    RETRYABLE = frozenset({"StateLoadFailed", "StatePersistFailed"})

    def __init__(
        self, reason: str, singleton: str, cause: BaseException | str | None = None
    ) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown SingletonError reason {reason!r}; one of {self.REASONS}")
        self.reason = reason
        self.singleton = singleton
        self.cause = cause
        detail = describe(cause) if isinstance(cause, BaseException) else (cause or "")
        super().__init__(f"{reason} in singleton {singleton!r}" + (f": {detail}" if detail else ""))

    @property
    def retryable(self) -> bool:
        return self.reason in self.RETRYABLE


class StateConflict(ClusterSingletonsError):
    """A compare-and-swap save found a newer version than the one it was based on."""

    def __init__(self, key: str, expected: int) -> None:
        self.key = key
        self.expected = expected
        super().__init__(
            f"state {key!r} changed since version {expected} was loaded; load it again and retry"
        )


class ClusterContextRequired(ClusterSingletonsError, LookupError):
    """``context.current()`` was called outside any cluster context."""

    def __init__(self) -> None:
        super().__init__(
            "no cluster context here: call this inside a singleton, a scheduled run, a task "
            "dispatched by one, or a `within_cluster(...)` block"
        )


class UnknownSingleton(ClusterSingletonsError, LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"no singleton named {name!r}; known: {', '.join(known) or 'none'}")
