"""Leader work used by the demo and the multi-process tests."""

from __future__ import annotations

import time

from cluster_singletons import Leadership
from project.demo.models import FencedWrite


def fenced_probe(leadership: Leadership) -> None:
    """Write one fenced row every 50 ms while leading."""
    while leadership.running:
        _write(leadership)
        leadership.sleep(0.05)


def stubborn_probe(leadership: Leadership) -> None:
    """Write one fenced row every 50 ms until a write is refused.

    It deliberately ignores the stop signal: it stands for leader code that does not
    cooperate, so tests prove that fencing, not politeness, stops a deposed leader.
    """
    while True:
        _write(leadership)
        time.sleep(0.05)


def _write(leadership: Leadership) -> None:
    term = leadership.term
    with leadership.fenced():
        FencedWrite.objects.create(lease=term.name, runner_id=term.runner_id, epoch=term.epoch)
