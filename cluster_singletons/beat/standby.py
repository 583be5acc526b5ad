"""A warm standby for the beat: while another runner leads, this one keeps the schedules
loaded and their cursors on the ledger, so that taking the lease is a short catch-up,
not a reload (seconds at a hundred thousand schedules, during which ticks go out late).

``BeatWork`` is the leader work of the ``beat`` lease with its standby: the runner runs
``stand_by`` in a thread of its own from registration to shutdown, and calls the work when
it takes the lease. The standby:

- loads every schedule once, as a leader does (``Loaded.load``), off the critical path;
- follows the ledger every ``_FOLLOW_EVERY`` seconds: the rows the leader recorded move
  the cursors (one indexed read of the rows created since the last one);
- looks for edited schedules every ``_LOOK_EVERY`` seconds (the leader's watcher looks
  every ``beat_refresh_interval``), and once more when it takes over;
- hands its schedules to the engine when its runner takes the lease (``take``), and gets
  them back when the term ends cleanly; after a term that failed, it loads again.

It writes nothing. A failure (the database away) is logged once, retried with backoff,
and costs only warmth: an engine given no loaded schedules loads them itself.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from datetime import datetime
from typing import Any

from django.db import connections

from cluster_singletons import metrics
from cluster_singletons._connection import drop_if_unusable
from cluster_singletons.beat.engine import BeatEngine
from cluster_singletons.beat.loaded import Loaded
from cluster_singletons.clock import Clock
from cluster_singletons.cluster.leadership import Leadership
from cluster_singletons.conf import ClusterSettings, get_settings
from cluster_singletons.errors import describe
from cluster_singletons.pacing import Backoff

logger = logging.getLogger("cluster_singletons.beat")

_FOLLOW_EVERY = 1.0
_LOOK_EVERY = 15.0


class Standby:
    """Schedules kept loaded while this runner does not lead; see the module docstring."""

    def __init__(self, app: Any, *, settings: ClusterSettings) -> None:
        self.app, self.settings = app, settings
        # Held while the schedules are read or moved, so a takeover waits for a load in
        # progress instead of starting another.
        self._lock = threading.Lock()
        self._loaded: Loaded | None = None
        self._leading = False
        self._next_look = 0.0

    def take(self) -> Loaded | None:
        """The schedules, for this runner's leader term (None: not loaded yet)."""
        with self._lock:
            self._leading = True
            loaded, self._loaded = self._loaded, None
        metrics.BEAT_STANDBY_WARM.set(0)
        return loaded

    def give_back(self, loaded: Loaded | None, *, at: datetime) -> None:
        """The term ended at ``at``: ``loaded`` as the engine left it (None: after a
        failure, load again)."""
        with self._lock:
            self._leading = False
            if loaded is not None:
                loaded.catalog.requeue()
                loaded.led_until(at)
            self._loaded = loaded
            self._next_look = 0.0

    def sync(self, clock: Clock) -> None:
        """One pass: load if not loaded, else follow the ledger and, when due, look for
        edited schedules. Nothing while this runner leads, or before ``clock`` (the
        runner's estimate of the database's clock) is known."""
        if not getattr(clock, "synced", True):
            return  # the runner's first renewal tells the database's clock; until then, wait
        with self._lock:
            if self._leading:
                return
            loaded = self._loaded
            if loaded is None:
                loaded = Loaded(
                    self.app,
                    using=self.settings.database,
                    overlap_timeout=self.settings.overlap_timeout,
                )
                loaded.load(clock.now())
                # They live as long as the process: keep the collector from walking them.
                gc.collect()
                gc.freeze()
                self._loaded = loaded
                self._next_look = time.monotonic() + _LOOK_EVERY
                logger.info("beat standby: %d schedules loaded", len(loaded.catalog))
            else:
                loaded.follow()
                if time.monotonic() >= self._next_look:
                    self._next_look = time.monotonic() + _LOOK_EVERY
                    # An edit takes effect from where the leader had got: it applied the
                    # edit then or before, and what it recorded since has been followed.
                    loaded.apply(loaded.look(), min(clock.now(), loaded.followed_to or clock.now()))
            if loaded.catalog.items > 2 * len(loaded.catalog) + 1000:
                loaded.catalog.requeue()
        metrics.BEAT_STANDBY_WARM.set(1)

    def run(self, stop: threading.Event, clock: Clock) -> None:
        """``sync`` every ``_FOLLOW_EVERY`` seconds until ``stop``; a failure is logged once,
        retried with backoff (the standby is cold meanwhile)."""
        backoff = Backoff.from_settings(self.settings)
        error: str | None = None
        try:
            while not stop.is_set():
                try:
                    self.sync(clock)
                except Exception as exc:
                    drop_if_unusable(self.settings.database)
                    metrics.BEAT_STANDBY_WARM.set(0)
                    if describe(exc) != error:
                        error = describe(exc)
                        logger.warning("beat standby failed (%s); retrying", error)
                    stop.wait(backoff.delay)
                    backoff = backoff.failed()
                    continue
                if error is not None:
                    logger.info("beat standby works again")
                    error, backoff = None, backoff.reset()
                stop.wait(_FOLLOW_EVERY)
        finally:
            connections.close_all()


class BeatWork:
    """Leader work for the ``beat`` lease (a fresh engine every term, on the runner's
    estimate of the database's clock), and its warm standby unless
    ``beat_standby = "cold"``."""

    def __init__(self, app: Any, *, settings: ClusterSettings | None = None) -> None:
        self.app = app
        self.settings = settings or get_settings()
        warm = self.settings.beat_standby == "warm"
        self.standby = Standby(app, settings=self.settings) if warm else None

    def __call__(self, leadership: Leadership) -> None:
        standby = self.standby
        loaded = standby.take() if standby is not None else None
        engine = BeatEngine(self.app, clock=leadership.clock, loaded=loaded)
        ended_cleanly = False
        try:
            engine.run(leadership)
            ended_cleanly = True
        finally:
            if standby is not None:
                loaded = engine.loaded if ended_cleanly else None
                standby.give_back(loaded, at=leadership.clock.now())

    def stand_by(self, stop: threading.Event, clock: Clock) -> None:
        """Run the standby until ``stop`` (the runner's thread for it)."""
        if self.standby is not None:
            self.standby.run(stop, clock)
