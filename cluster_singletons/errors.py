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
            f"database unreachable for {waited:.1f}s (last error: {describe(cause)}); "
            "check DATABASES and that the server is up, or raise "
            "CLUSTER_SINGLETONS['startup_timeout']"
        )


def describe(exc: BaseException) -> str:
    """One line naming an exception, for logs that must not carry a traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


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


class MachineIdsExhausted(ClusterSingletonsError):
    """No Snowflake machine id could be leased: all 1,024 are held by live processes."""

    def __init__(self, database: str, ttl: float) -> None:
        self.database = database
        self.ttl = ttl
        super().__init__(
            f"no Snowflake machine id is free in database {database!r}: all 1024 are held by "
            "live processes (each process holds one), or the free ones were last used with "
            "timestamps ahead of this host's clock. Stop processes you do not need, wait up to "
            f"{ttl:g}s for the ids of crashed processes to expire ('machine_id_ttl'), "
            "or check this host's clock"
        )


class MachineIdUnavailable(ClusterSingletonsError):
    """The database could not be asked for a Snowflake machine id."""

    def __init__(self, database: str | None, cause: BaseException) -> None:
        self.database = database
        self.cause = cause
        where = f"database {database!r}" if database else "the database"
        hint = ""
        if "locked" in str(cause):
            hint = (
                " On SQLite, generate this process's first id outside any transaction (at "
                "startup, or in a session-scoped test fixture); later ids need no database."
            )
        super().__init__(
            f"could not lease a Snowflake machine id from {where} ({describe(cause)}): "
            "Snowflake ids need Django set up (settings configured, django.setup() called), "
            "'cluster_singletons' in INSTALLED_APPS with its migrations applied "
            "(python manage.py migrate), and the database reachable." + hint
        )


class ClockMovedBackwards(ClusterSingletonsError):
    """The wall clock stepped back further than ``max_clock_rollback`` allows waiting out."""

    def __init__(self, behind_ms: int, bound_ms: int) -> None:
        self.behind_ms = behind_ms
        self.bound_ms = bound_ms
        super().__init__(
            f"the wall clock is {behind_ms} ms behind the last Snowflake id this process "
            f"issued, more than 'max_clock_rollback' ({bound_ms} ms) allows waiting out; no id "
            "is issued until the clock catches up, since ids must never repeat or decrease. "
            "Check the host's time synchronisation, raise 'max_clock_rollback', or restart the "
            "process (a new process leases another machine id and can issue at once)"
        )


class SnowflakeTimeOutOfRange(ClusterSingletonsError, OverflowError):
    """The wall clock lies outside the 41-bit millisecond range of the Snowflake epoch."""

    def __init__(self, now_ms: int, epoch_ms: int) -> None:
        self.now_ms = now_ms
        self.epoch_ms = epoch_ms
        if now_ms < epoch_ms:
            what = (
                f"the wall clock (Unix ms {now_ms}) is before 'snowflake_epoch_ms' "
                f"({epoch_ms}): set the epoch to an instant in the past"
            )
        else:
            what = (
                f"41 bits of milliseconds since 'snowflake_epoch_ms' ({epoch_ms}) ran out at "
                f"Unix ms {epoch_ms + 2**41 - 1}: no Snowflake id can be issued any more"
            )
        super().__init__(what)


class InvalidSnowflake(ClusterSingletonsError, ValueError):
    """A value that is not a Snowflake id (not a 63-bit non-negative integer)."""

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(
            f"{value!r} is not a Snowflake id: expected a non-negative integer below 2**63, "
            "or its decimal string"
        )


class ScheduleInvalid(ClusterSingletonsError, ValueError):
    """A schedule cannot be computed (bad cron expression, unknown zone or task, ...).

    The beat flags that one schedule and keeps running every other.
    """


#: Known names an "unknown schedule" error lists at most.
_KNOWN_SHOWN = 20


class UnknownSchedule(ClusterSingletonsError, LookupError):
    """No schedule has this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        shown = ", ".join(known[:_KNOWN_SHOWN]) or "none"
        if len(known) > _KNOWN_SHOWN:
            shown += (
                f" and {len(known) - _KNOWN_SHOWN:,} more (`python manage.py cron_preview --list`)"
            )
        super().__init__(f"no schedule named {name!r}; known: {shown}")


class DeliveryNotCancellable(ClusterSingletonsError):
    """A delayed delivery was already dispatched or cancelled."""

    def __init__(self, delivery_id: int, status: str) -> None:
        self.delivery_id = delivery_id
        self.status = status
        super().__init__(f"delivery {delivery_id} is {status}; only pending ones can be cancelled")


class TaskKeyInvalid(ClusterSingletonsError, ValueError):
    """A singleton task's key could not be made for one call; the task fails, no lease
    is taken."""

    def __init__(self, task: str, problem: str) -> None:
        self.task, self.problem = task, problem
        super().__init__(
            f"singleton task {task!r}: {problem} (singleton_key must name arguments of the "
            "task, or be a callable returning JSON-serialisable data)"
        )

    def __reduce__(self) -> tuple[type[TaskKeyInvalid], tuple[str, str]]:
        return type(self), (self.task, self.problem)  # a result backend pickles it


class TaskKeyHeld(ClusterSingletonsError):
    """A singleton task's key stayed held by another run (policy ``wait``, or ``retry``
    once the retries are spent)."""

    def __init__(self, task: str, key: str, waited: float | None = None) -> None:
        self.task, self.key, self.waited = task, key, waited
        after = f" after waiting {waited:.1f}s" if waited is not None else ""
        super().__init__(f"singleton task {task!r}: key {key} is held by another run{after}")

    def __reduce__(self) -> tuple[type[TaskKeyHeld], tuple[str, str, float | None]]:
        return type(self), (self.task, self.key, self.waited)


class NoClusterLock(ClusterSingletonsError, LookupError):
    """``self.cluster_lock`` was read outside the body of a singleton task's run."""

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(
            f"task {task!r} holds no key here: self.cluster_lock exists only while the body "
            "of a SingletonTask runs (and for that task)"
        )
