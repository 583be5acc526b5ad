"""What the singleton tests share: a state model, declaring singletons, and a real
leadership term run in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from django.db import connections
from pydantic import BaseModel

from cluster_singletons.cluster import leases, membership
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.singletons import registry
from cluster_singletons.singletons.driver import SingletonDriver

FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.04}


class Count(BaseModel):
    n: int = 0


def declare(declared: list[str], name: str, **kwargs: Any) -> Callable[[Any], Any]:
    declared.append(name)
    return registry.singleton(name, **kwargs)


class Term:
    """A real leadership term of a singleton, run in a thread until ended."""

    def __init__(self, spec: registry.SingletonSpec) -> None:
        leases.ensure([spec.lease], using="default")
        runner = membership.register(host="t", pid=1, kind="runcluster", using="default")
        term = leases.acquire(spec.lease, runner, ttl=30, using="default")
        assert term is not None
        self.stop = threading.Event()
        self.leadership = Leadership(term=term, stop_event=self.stop, using="default", ttl=30)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(SingletonDriver(spec),))
        self.thread.start()

    def _run(self, driver: SingletonDriver) -> None:
        try:
            driver(self.leadership)
        except BaseException as exc:
            self.error = exc
        finally:
            connections.close_all()  # as the runner's slot does when work ends

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
