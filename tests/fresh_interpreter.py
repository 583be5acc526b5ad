"""Running code in a fresh interpreter with no Django settings, as a settings module or
``celery.py`` imports the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_unconfigured(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` from the project root without ``DJANGO_SETTINGS_MODULE``."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
