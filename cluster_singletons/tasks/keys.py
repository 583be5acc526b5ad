"""The key a singleton task's call runs under, and the lease that holds it.

Pure: no database, no Celery worker. A key is the task's name plus either

- the values of chosen arguments, bound to the task's signature as Celery would call it
  (so ``f(1, b=2)`` and ``f(a=1, b=2)`` share a key, and defaults count), or
- what a callable returns for the call's ``(*args, **kwargs)``.

Its value is canonical JSON (sorted keys, no NaN), so equal keys are equal text on every
worker; the lease is ``task:<task name>:<digest>`` under ``key_prefix`` (at most 200
characters: a long task name is shortened, the digest covers the whole of it).
Anything that cannot be made into a key raises ``TaskKeyInvalid`` naming the task.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster_singletons.errors import TaskKeyInvalid

#: Leases of singleton tasks are ``task:<task name>:<digest>`` (before ``key_prefix``).
TASK_PREFIX = "task:"
#: The longest lease name (``Lease.name``).
NAME_MAX = 200
_DIGEST_CHARS = 32

KeySpec = Sequence[str] | Callable[..., Any] | None


@dataclass(frozen=True, kw_only=True)
class TaskKey:
    """One (task, key): ``value`` is the key's canonical JSON, ``lease`` its lease name."""

    task: str
    value: str
    lease: str


def _canonical(task: str, value: object) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TaskKeyInvalid(task, f"the key {value!r} is not JSON-serialisable ({exc})") from exc


def lease_name(task: str, value: str, key_prefix: str) -> str:
    """The lease holding key ``value`` of ``task``, as stored."""
    digest = hashlib.blake2b(f"{task}\x00{value}".encode(), digest_size=16).hexdigest()
    room = NAME_MAX - len(key_prefix) - len(TASK_PREFIX) - 1 - _DIGEST_CHARS
    return f"{key_prefix}{TASK_PREFIX}{task[:room]}:{digest}"


def _bound(
    task: str, run: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    try:
        bound = inspect.signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        raise TaskKeyInvalid(task, f"its arguments do not fit its signature ({exc})") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


def key_value(
    task: str,
    run: Callable[..., Any],
    spec: KeySpec,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> object:
    """The key of one call, before it is made canonical.

    - ``spec`` None: every argument, by name; an empty sequence: one key for the task.
    - A sequence of names: those arguments, by name (an unknown name is refused).
    - A callable: its result for ``(*args, **kwargs)``; whatever it raises is refused.
    """
    if callable(spec):
        try:
            return spec(*args, **kwargs)
        except Exception as exc:
            raise TaskKeyInvalid(
                task, f"its key function raised {type(exc).__name__}: {exc}"
            ) from exc
    if isinstance(spec, str):
        raise TaskKeyInvalid(task, f"singleton_key {spec!r} is a string, not a tuple of names")
    arguments = _bound(task, run, args, kwargs)
    if spec is None:
        return {name: _plain(value) for name, value in arguments.items()}
    unknown = [name for name in spec if name not in inspect.signature(run).parameters]
    if unknown:
        raise TaskKeyInvalid(task, f"singleton_key names no argument {', '.join(unknown)}")
    return {name: _plain(arguments[name]) for name in spec}


def _plain(value: object) -> object:
    """``*args`` bind as a tuple: the same key as the list a message carries."""
    return list(value) if isinstance(value, tuple) else value


def key_of(
    task: str,
    run: Callable[..., Any],
    spec: KeySpec,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    key_prefix: str,
) -> TaskKey:
    """The ``TaskKey`` of one call of ``task`` (``TaskKeyInvalid`` if there is none)."""
    value = _canonical(task, key_value(task, run, spec, args, kwargs))
    return TaskKey(task=task, value=value, lease=lease_name(task, value, key_prefix))
