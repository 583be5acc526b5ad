"""The probe file: what one runner says of itself, for probes that ask about this process
(a Kubernetes pod's liveness and readiness), never about the cluster's health.

With ``probe_file`` set, each runner writes a small JSON file from its coordinator loop,
at most once a second and whenever what it says changes, atomically (a probe never reads
half a file): its runner id, host, pid and kind, ``loop_at`` (the wall time of the loop
pass; the file's mtime is the same instant, for exec probes that only look at that),
``renewed_at`` (its last renewal of its registration) and whether it is stopping. A
clean exit removes it.

- ``live``: the loop passed within ``lease_ttl``. The loop passes at least every
  ``renew_interval``, also while the database is unreachable, so only a hung or dead
  loop fails it.
- ``ready``: live, registered, not stopping, and its registration renewed within
  ``lease_ttl``: the cluster sees this runner.

Imports only the standard library, so an exec probe need not start Django:
``python -m cluster_singletons.cluster.probe live|ready FILE`` (exit 0 or 1, one line).
Nothing here touches the database.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster_singletons.conf import ClusterSettings

logger = logging.getLogger("cluster_singletons.runner")

CHECKS = ("live", "ready")
#: A runner rewrites an unchanged file at most this often (seconds).
WRITE_EVERY = 1.0


def path_for(template: str, kind: str) -> Path | None:
    """The probe file of a runner of ``kind`` (``None``: no file is configured)."""
    return Path(template.replace("{kind}", kind)) if template else None


class ProbeFile:
    """The probe file one runner writes (a no-op without a path)."""

    def __init__(
        self,
        path: Path | None,
        *,
        kind: str = "",
        lease_ttl: float = 0.0,
        renew_interval: float = 0.0,
    ) -> None:
        self.path = path
        self._fixed = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "kind": kind,
            "lease_ttl": lease_ttl,
            "renew_interval": renew_interval,
        }
        self._said: tuple[Any, ...] = ()
        self._written = 0.0
        self._failed = ""

    @classmethod
    def of(cls, settings: ClusterSettings, kind: str) -> ProbeFile:
        return cls(
            path_for(settings.probe_file, kind),
            kind=kind,
            lease_ttl=settings.lease_ttl,
            renew_interval=settings.renew_interval,
        )

    def touch(
        self, *, runner_id: int | None, renewed: float | None, now: float, stopping: bool
    ) -> None:
        """Say that the loop passes at monotonic ``now``; ``renewed``: the monotonic time of
        the last renewal of the registration. A failed write is logged (once per distinct
        error), never raised: the probe then fails, the loop goes on."""
        if self.path is None:
            return
        wall = time.time()
        said = (runner_id, renewed is None, stopping)
        if said == self._said and wall - self._written < WRITE_EVERY:
            return
        body = {
            **self._fixed,
            "runner": runner_id,
            "loop_at": wall,
            "renewed_at": None if renewed is None else wall - (now - renewed),
            "stopping": stopping,
        }
        try:
            _write_atomically(self.path, json.dumps(body))
        except OSError as exc:
            if str(exc) != self._failed:
                logger.error("cannot write the probe file %s: %s", self.path, exc)
            self._failed = str(exc)
            return
        self._said, self._written, self._failed = said, wall, ""

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True, kw_only=True)
class Verdict:
    ok: bool
    text: str


def judge(check: str, said: dict[str, Any], now: float) -> Verdict:
    """Whether the runner whose probe file says ``said`` passes ``check`` at wall time
    ``now`` (a pure function)."""
    who = f"runner {said.get('runner')} ({said.get('kind')}, pid {said.get('pid')})"
    ttl = float(said["lease_ttl"])
    loop_ago = now - float(said["loop_at"])
    if loop_ago > ttl:
        return Verdict(
            ok=False,
            text=f"not live: {who}: its loop last passed {loop_ago:.1f} s "
            f"ago (more than lease_ttl, {ttl:g} s)",
        )
    if check == "live":
        return Verdict(ok=True, text=f"live: {who}: its loop passed {loop_ago:.1f} s ago")
    if said.get("runner") is None:
        return Verdict(ok=False, text=f"not ready: {who}: not registered yet")
    if said.get("stopping"):
        return Verdict(ok=False, text=f"not ready: {who}: stopping")
    renewed = said.get("renewed_at")
    if renewed is None:
        return Verdict(ok=False, text=f"not ready: {who}: its registration was never renewed")
    renewed_ago = now - float(renewed)
    if renewed_ago > ttl:
        return Verdict(
            ok=False,
            text=f"not ready: {who}: its registration was last renewed "
            f"{renewed_ago:.1f} s ago (more than lease_ttl, {ttl:g} s)",
        )
    return Verdict(ok=True, text=f"ready: {who}: registration renewed {renewed_ago:.1f} s ago")


def probe(check: str, path: Path, *, now: float | None = None) -> Verdict:
    """``judge`` the probe file at ``path``; a file that is missing or unreadable fails."""
    try:
        said = json.loads(path.read_text())
        return judge(check, said, time.time() if now is None else now)
    except FileNotFoundError:
        return Verdict(ok=False, text=f"not {check}: no probe file {path} (no runner wrote it)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(ok=False, text=f"not {check}: the probe file {path} is unreadable: {exc}")


def main(argv: Sequence[str]) -> int:
    """``python -m cluster_singletons.cluster.probe live|ready FILE``: 0 pass, 1 fail,
    2 misuse; one line either way."""
    if len(argv) != 2 or argv[0] not in CHECKS:
        print("usage: python -m cluster_singletons.cluster.probe live|ready FILE", file=sys.stderr)
        return 2
    verdict = probe(argv[0], Path(argv[1]))
    print(verdict.text, file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
