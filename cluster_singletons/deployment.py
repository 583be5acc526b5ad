"""The rows of this deployment: several deployments may share one database, each under
its own ``key_prefix``.

Leases and state keys carry the prefix (``names.prefixed``); so do the keys the beat
stores for schedules: the run ledger's ``schedule``, schedule records, heartbeats, and the
deliveries' own column. Each deployment reads and writes only its own rows, and its task
ids (derived from the stored key) differ from another's for the same schedule and tick.

Invariants:

- With ``key_prefix = ""`` nothing stored changes: keys are stored as they are.
- In memory a schedule's key is never prefixed (``beat:x``, ``cron:x``): code that parses
  keys sees them as before; ``stored`` and ``loaded`` convert at the stores.
- An unprefixed deployment's rows are those whose key starts with a schedule kind (or is a
  lease's name); a prefix may not start with one (the settings refuse it), so no row is both.
"""

from __future__ import annotations

from django.db.models import Q

from cluster_singletons import names
from cluster_singletons.conf import get_settings

SCHEDULE_KINDS = names.SCHEDULE_KINDS


def prefix() -> str:
    return get_settings().key_prefix


def stored(key: str) -> str:
    """``key`` as this deployment stores it."""
    return prefix() + key


def loaded(stored_key: str) -> str:
    """A stored key of this deployment as the code knows it."""
    return stored_key.removeprefix(prefix())


def schedules(field: str) -> Q:
    """This deployment's rows, by the schedule key in ``field``."""
    return _starting(field, SCHEDULE_KINDS)


def heartbeats(field: str = "name") -> Q:
    """This deployment's heartbeats: the beat's, singletons' and schedules'."""
    mine = _starting(field, (names.SINGLETON_PREFIX, *SCHEDULE_KINDS))
    return mine | Q(**{field: stored(names.BEAT)})


def _starting(field: str, kinds: tuple[str, ...]) -> Q:
    # The prefix and the kind: a deployment "app" must not see "app1:beat:x".
    own = prefix()
    found = Q()
    for kind in kinds:
        found |= Q(**{f"{field}__startswith": own + kind})
    return found


def leases(field: str = "name") -> Q:
    """This deployment's leases: the beat's and the singletons'."""
    return Q(**{field: stored(names.BEAT)}) | Q(
        **{f"{field}__startswith": stored(names.SINGLETON_PREFIX)}
    )


def states(field: str = "key") -> Q:
    """This deployment's state rows. Under a prefix, the keys that carry it; unprefixed,
    every key but another deployment's singletons' (a standalone store's key is the
    application's own and carries no kind)."""
    own = prefix()
    if own:
        return Q(**{f"{field}__startswith": own})
    mine = Q(**{f"{field}__startswith": names.SINGLETON_PREFIX})
    return mine | ~Q(**{f"{field}__contains": names.SINGLETON_PREFIX})
