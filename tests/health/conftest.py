"""Fixtures of the health tests: the beat tests' Celery ``app`` on kombu's in-memory broker."""

from __future__ import annotations

from tests.beat.test_engine import _give_back_machine_id, app  # noqa: F401 (fixtures)
