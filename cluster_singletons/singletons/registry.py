"""The singleton registry: ``@singleton("name", state=Model)`` records a ``SingletonSpec``.

Decorating happens at import time and does no I/O; runners stand for the lease
``singleton:<name>`` of every registered spec and, while they lead it, drive the function
(``driver``). Discovery: each installed app's ``singletons`` module is imported by
``AppConfig.ready()``, as the admin does with ``admin`` modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cluster_singletons import names
from cluster_singletons._registration import register_once
from cluster_singletons.errors import (
    SingletonConfigError,
    UnknownSingleton,
)
from cluster_singletons.singletons import state_versions

logger = logging.getLogger("cluster_singletons.singletons")

#: Singleton leases are named ``singleton:<name>`` (before ``key_prefix``).
LEASE_PREFIX = names.SINGLETON_PREFIX
#: A lifecycle hook: called with the singleton's context.
Hook = Callable[..., Any]


class _NoState(BaseModel):
    """The state of a singleton declared without one."""


@dataclass(frozen=True, kw_only=True)
class SingletonSpec:
    name: str
    fn: Callable[..., Any]
    state: type[BaseModel]
    interval: float
    on_become_leader: Hook | None
    on_lose_leadership: Hook | None

    @property
    def lease(self) -> str:
        return names.singleton_lease(self.name)


_registry: dict[str, SingletonSpec] = {}


def singleton(
    name: str,
    *,
    state: type[BaseModel] | None = None,
    interval: float = 60.0,
    on_become_leader: Hook | None = None,
    on_lose_leadership: Hook | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare ``fn(ctx)`` a cluster singleton named ``name``.

    ``interval``: a function that returns is called again this many seconds later, and a
    heartbeat is expected at least this often.
    """
    if not name or not isinstance(name, str) or len(LEASE_PREFIX + name) > 200:
        raise SingletonConfigError(str(name), "name must be a non-empty string of <= 190 chars")
    found = state_versions.problems(state) if state is not None else []
    if found:
        raise SingletonConfigError(name, "; ".join(found))
    if interval <= 0:
        raise SingletonConfigError(name, f"interval must be > 0, not {interval!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = SingletonSpec(
            name=name,
            fn=fn,
            state=state or _NoState,
            interval=interval,
            on_become_leader=on_become_leader,
            on_lose_leadership=on_lose_leadership,
        )
        register_once(
            _registry, name, spec, name=name, fn=fn, registered_fn=lambda s: s.fn, what="singleton"
        )
        return fn

    return register


def registered() -> Mapping[str, SingletonSpec]:
    return dict(_registry)


def get(name: str) -> SingletonSpec:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownSingleton(name, sorted(_registry)) from None


def unregister(name: str) -> None:
    """Forget a singleton (tests)."""
    _registry.pop(name, None)
