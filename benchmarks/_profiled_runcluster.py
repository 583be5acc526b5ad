"""``manage.py runcluster`` with the beat engine's thread under cProfile, for
``benchmarks.beat --profile``.

    python -m benchmarks._profiled_runcluster STATS_FILE

The command runs unchanged in this process; ``BeatEngine.run`` (the ``lead:beat`` thread)
is profiled from the start of each term to its end, and the stats are written to
``STATS_FILE`` (``pstats`` format) when the term ends (SIGTERM ends it). A diagnostic only:
profiling slows the engine down, so its timings are not the benchmark's.
"""

from __future__ import annotations

import cProfile
import os
import sys
from typing import Any


def main() -> None:
    out = sys.argv[1]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django
    from django.core.management import call_command

    django.setup()
    from cluster_singletons.beat import engine

    original = engine.BeatEngine.run

    def profiled(self: Any, leadership: Any) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            original(self, leadership)
        finally:
            profile.disable()
            profile.dump_stats(out)

    engine.BeatEngine.run = profiled  # type: ignore[method-assign]
    call_command("runcluster")


if __name__ == "__main__":
    main()
