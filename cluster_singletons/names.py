"""Names the subsystems share: lease names, state keys, schedule kinds and the overlap
policies.

Every lease and state key is stored under ``key_prefix`` (one database may serve several
clusters); these functions apply it, so no caller spells a prefix by hand (schedule keys:
``deployment``).
"""

from __future__ import annotations

from typing import Literal

#: The beat's lease, and the name of its heartbeat.
BEAT = "beat"
#: Leases (and state keys) of singletons are ``singleton:<name>``.
SINGLETON_PREFIX = "singleton:"
#: Every schedule key starts with its kind: ``beat:x``, ``periodic:x``, ``cron:x``,
#: ``delivery:<id>``.
SCHEDULE_KINDS = ("beat:", "periodic:", "cron:", "delivery:")
#: A ``key_prefix`` may not start with these: its keys would read as an unprefixed one's.
RESERVED_PREFIXES = (SINGLETON_PREFIX, *SCHEDULE_KINDS)

Overlap = Literal["skip", "buffer_one", "allow_all"]
#: What the beat does when a schedule's previous run has not finished.
OVERLAPS: tuple[Overlap, ...] = ("skip", "buffer_one", "allow_all")
OVERLAP_CHOICES = [(policy, policy.replace("_", " ")) for policy in OVERLAPS]


def singleton_lease(name: str) -> str:
    """The lease (and state key) of singleton ``name``, before ``key_prefix``."""
    return SINGLETON_PREFIX + name


def prefixed(name: str, key_prefix: str) -> str:
    """``name`` as stored: under ``key_prefix``."""
    return key_prefix + name


def singleton_of(stored_key: str, key_prefix: str) -> str | None:
    """The singleton whose stored lease or state key this is (None: not a singleton's)."""
    unprefixed = stored_key.removeprefix(key_prefix) if stored_key.startswith(key_prefix) else None
    if unprefixed is None or not unprefixed.startswith(SINGLETON_PREFIX):
        return None
    return unprefixed.removeprefix(SINGLETON_PREFIX)
