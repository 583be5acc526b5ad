"""What the schedule commands share: errors become clear messages and exit statuses."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar

from django.core.management.base import CommandError

from cluster_singletons.errors import ClusterSingletonsError, UnknownSchedule, UnknownSingleton

F = TypeVar("F", bound=Callable[..., Any])


def clear_errors(handle: F) -> F:
    """Unknown names exit 2; invalid input and refused actions exit 1, without a traceback."""

    @wraps(handle)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handle(*args, **kwargs)
        except (UnknownSchedule, UnknownSingleton) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        except (ClusterSingletonsError, ValueError) as exc:
            raise CommandError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def when(text: str) -> datetime:
    """An ISO 8601 time from the command line; naive means UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-11-01T03:00") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
