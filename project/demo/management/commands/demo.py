"""``python manage.py demo``: a local cluster of three runners and a worker, and a failover."""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand
from django.db.models import Count, Sum
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from cluster_singletons.conf import get_settings
from cluster_singletons.models import Lease, Run, StateRecord
from project.demo.localcluster import Cluster, Leader, poll
from project.demo.models import FencedWrite
from project.demo.tasks import ping

BEAT_DEMO = "demo-every-second"


class Command(BaseCommand):
    help = "Run 3 runners and a Celery worker, kill the leader, show the takeover (~1 minute)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--settle", type=float, default=15.0, help="Seconds to run before each kill."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settle: float = options["settle"]
        settings = get_settings()
        with tempfile.TemporaryDirectory(prefix="cluster-demo-") as tmp:
            cluster = Cluster(
                Path(tmp),
                {},
                lead=["probe=project.demo.work:fenced_probe"],
                # Slow the indexer so its run spans the failovers the demo causes.
                env={"CLUSTER_DEMO_BATCH_PAUSE": "3"},
            )
            try:
                self._run(cluster, settle, settings.lease_ttl)
            finally:
                cluster.stop()

    def _run(self, cluster: Cluster, settle: float, ttl: float) -> None:
        say = self.stdout.write
        say(f"starting 3 runners and a Celery worker (lease TTL {ttl:g}s) ...")
        every, _ = IntervalSchedule.objects.get_or_create(every=1, period="seconds")
        PeriodicTask.objects.update_or_create(
            name=BEAT_DEMO, defaults={"task": "demo.ping", "interval": every, "args": '["beat"]'}
        )
        say(f"scheduled {BEAT_DEMO!r}: demo.ping every second, dispatched by the beat leader")
        worker = cluster.start_worker()
        cluster.start(3)
        first = cluster.wait_for_leader("probe")
        say(self._who(first, "probe") + "; it writes a fenced row every 50 ms")
        say(self._who(cluster.wait_for_leader("beat"), "beat"))
        time.sleep(settle)

        say(f"SIGKILL the leader of 'probe' (pid {first.pid}) ...")
        sent = cluster.signal(first.pid, signal.SIGKILL)
        second = cluster.wait_for_leader("probe", other_than=first, timeout=ttl + 30)
        killed_after = time.monotonic() - sent
        say(self._who(second, "probe") + f": took over {killed_after:.2f}s after the kill")
        time.sleep(settle / 2)

        say(f"SIGTERM the leader of 'probe' (pid {second.pid}): it hands off and exits ...")
        sent = cluster.signal(second.pid, signal.SIGTERM)
        third = cluster.wait_for_leader("probe", other_than=second, timeout=ttl + 30)
        handoff_after = time.monotonic() - sent
        exit_code = cluster.node(second.pid).process.wait(timeout=30)
        say(
            self._who(third, "probe") + f": took over {handoff_after:.2f}s after SIGTERM "
            f"(old leader exited {exit_code})"
        )

        (fresh,) = cluster.start(1)
        say(f"started runner pid {fresh.pid} so the beat has a standby")
        beat_before = cluster.wait_for_leader("beat")
        say(f"SIGKILL the leader of 'beat' (pid {beat_before.pid}) ...")
        sent = cluster.signal(beat_before.pid, signal.SIGKILL)
        killed_at = timezone.now()
        beat_after = cluster.wait_for_leader("beat", other_than=beat_before, timeout=ttl + 30)
        beat_took = time.monotonic() - sent
        say(self._who(beat_after, "beat") + f": took over {beat_took:.2f}s after the kill")
        resumed_after = killed_at + dt.timedelta(seconds=beat_took + 6)
        poll(
            "the beat to dispatch on time again",
            lambda: Run.objects.filter(
                schedule=f"periodic:{BEAT_DEMO}",
                epoch=beat_after.epoch,
                tick__gt=resumed_after,
                published_at__isnull=False,
            ).exists(),
            timeout=60,
        )
        failover = self._failover_summary(killed_at, beat_before.epoch, beat_after.epoch)
        say(failover)

        note = uuid.uuid4().hex[:8]
        ping.delay(note)
        poll("the worker to run the task", lambda: f"ping {note}" in worker.text(), timeout=60)
        say(f"the Celery worker ran demo.ping({note!r}) from the broker")

        for lease in Lease.objects.filter(name__startswith="singleton:").order_by("name"):
            state = StateRecord.objects.filter(key=lease.name).first()
            say(
                f"singleton {lease.name.removeprefix('singleton:')!r}: led by runner "
                f"{lease.holder_id} at epoch {lease.epoch}; state v{state.version if state else 0} "
                f"{state.value if state else '(defaults)'}"
            )
        indexer = StateRecord.objects.filter(key="singleton:indexer").first()

        beat = self._beat_summary()
        say(beat)
        writes = FencedWrite.objects.filter(lease="probe")
        late = sum(
            writes.filter(epoch=old.epoch, id__gt=first_of_next).count()
            for old, first_of_next in self._term_starts(writes, [first, second, third])
        )
        say(
            f"SUMMARY takeover after SIGKILL {killed_after:.2f}s (TTL {ttl:g}s), handoff after "
            f"SIGTERM {handoff_after:.2f}s, epochs {first.epoch}->{second.epoch}->{third.epoch}, "
            f"{writes.count()} fenced writes, {late} from deposed leaders after takeover; "
            f"indexer state {indexer.value if indexer else '(none)'} across the failovers; "
            f"beat takeover after SIGKILL {beat_took:.2f}s, {failover}; " + beat
        )

    @staticmethod
    def _failover_summary(killed_at: Any, before: int, after: int) -> str:
        """The every-second ticks from 5 s before the beat leader's kill to 5 s into its
        successor's term: each went out once on time (within 1 s), late, or coalesced."""
        runs = Run.objects.filter(schedule=f"periodic:{BEAT_DEMO}", epoch__in=[before, after])
        window = runs.filter(tick__gte=killed_at - dt.timedelta(seconds=5)).order_by("tick")
        first_new = runs.filter(epoch=after).order_by("tick").first()
        if first_new is not None:
            window = window.filter(tick__lte=first_new.tick + dt.timedelta(seconds=5))
        on_time = late = coalesced = 0
        for run in window.exclude(status__in=["skipped", "error"]):
            if run.ticks > 1:
                coalesced += run.ticks
            elif run.published_at and run.published_at - run.tick > dt.timedelta(seconds=1):
                late += 1
            else:
                on_time += 1
        return (
            f"ticks across the beat failover: {on_time} on time, {late} late (> 1 s), "
            f"{coalesced} coalesced"
        )

    @staticmethod
    def _beat_summary() -> str:
        runs = Run.objects.filter(schedule=f"periodic:{BEAT_DEMO}")
        by_status = dict(runs.values_list("status").annotate(n=Count("id")))
        dispatched = runs.exclude(status__in=["skipped", "error"])
        ticks = dispatched.aggregate(n=Sum("ticks"))["n"] or 0
        return (
            f"beat: {dispatched.count()} runs of {BEAT_DEMO!r} covering {ticks} ticks, each "
            f"tick once ({ticks - dispatched.count()} coalesced after takeovers), "
            f"{by_status.get('skipped', 0)} skipped, "
            f"{by_status.get('succeeded', 0)} reported done by the worker"
        )

    @staticmethod
    def _who(leader: Leader, lease: str) -> str:
        who = f"runner {leader.runner_id} (pid {leader.pid})"
        return f"{lease!r} is led by {who} at epoch {leader.epoch}"

    @staticmethod
    def _term_starts(writes: Any, terms: list[Leader]) -> list[tuple[Leader, int]]:
        pairs = []
        for old, new in itertools.pairwise(terms):
            first_new = writes.filter(epoch=new.epoch).order_by("id").first()
            if first_new is not None:
                pairs.append((old, first_new.id))
        return pairs
