"""A real PgBouncer for tests and benchmarks: transaction pooling, server connections
recycled within seconds (as ``server_lifetime`` / ``server_idle_timeout`` do in
production), default settings otherwise. Debian's ``pgbouncer`` must be installed
(``.ci/run`` installs it).

    python -m project.demo.pgbouncer PORTFILE   # one in front of 127.0.0.1:5432
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {auth}
pool_mode = transaction
server_lifetime = {lifetime}
server_idle_timeout = {lifetime}
max_client_conn = 500
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
"""


class Missing(RuntimeError):
    """PgBouncer is not installed."""


def binary() -> str:
    """The pgbouncer executable; ``Missing`` when it is not installed."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise Missing("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


class PgBouncer:
    """One PgBouncer process in front of ``upstream``; ``stop()``/``start()`` restart it
    on the same port."""

    def __init__(self, upstream: tuple[str, int], *, user: str, lifetime: int = 1) -> None:
        self.executable = binary()
        self.dir = Path(tempfile.mkdtemp(prefix="cs-pgbouncer-"))
        # PgBouncer refuses to run as root; it then runs as the database's OS user.
        self.dir.chmod(0o755)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        auth = self.dir / "users.txt"
        auth.write_text(f'"{user}" ""\n')
        self.config = self.dir / "pgbouncer.ini"
        self.config.write_text(
            _CONFIG.format(
                host=upstream[0],
                port=upstream[1],
                listen=self.port,
                auth=auth,
                lifetime=lifetime,
            )
        )
        self.log = self.dir / "pgbouncer.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.executable]
        if os.geteuid() == 0:
            args += ["-u", "postgres"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*args, str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self, how: signal.Signals = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    """``python -m project.demo.pgbouncer PORTFILE``: run one in front of 127.0.0.1:5432 until
    killed (SIGTERM), writing its port to PORTFILE once it accepts connections."""
    import sys

    bouncer = PgBouncer(("127.0.0.1", 5432), user="postgres")
    bouncer.start()
    Path(sys.argv[1]).write_text(str(bouncer.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        assert bouncer.process is not None
        bouncer.process.wait()
    finally:
        bouncer.close()


if __name__ == "__main__":
    main()
