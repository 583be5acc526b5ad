"""What ``@singleton`` and ``@cron`` share: a name is registered by one function only."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

from cluster_singletons.errors import SingletonConfigError

T = TypeVar("T")


def qualname(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of ``fn``: the same function imported twice has the same one."""
    return f"{fn.__module__}.{fn.__qualname__}"


def register_once(
    registry: MutableMapping[str, T],
    key: str,
    entry: T,
    *,
    name: str,
    fn: Callable[..., Any],
    registered_fn: Callable[[T], Callable[..., Any] | None],
    what: str,
) -> None:
    """Store ``entry`` under ``key`` unless another function already holds it.

    Re-registering the same function (a module imported twice, an autoreload) replaces
    the entry; a different function raises ``SingletonConfigError`` naming both.
    """
    existing = registry.get(key)
    if existing is not None:
        before = registered_fn(existing)
        if before is not None and qualname(before) != qualname(fn):
            raise SingletonConfigError(
                name, f"{what} registered twice: by {qualname(before)} and by {qualname(fn)}"
            )
    registry[key] = entry
