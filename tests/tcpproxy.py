"""How tests take the database away: a TCP proxy they can cut (the database "goes down"
for the processes behind it), and the server ending one thread's session."""

from __future__ import annotations

import contextlib
import socket
import threading

from django.db import OperationalError, connections


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; ``cut()`` drops every connection and
    refuses new ones until ``restore()``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            # close() alone leaves the socket listening while the accept thread is blocked
            # in accept(): one more connection would get through the cut. shutdown() wakes it.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                cut = self._listener is not listener
                if not cut:
                    self._open.update((client, server))
            if cut:  # accepted as the cut began: it must not outlive it
                client.close()
                server.close()
                return
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # either side closed or was cut: the other pump ends too
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def end_session(using: str = "default") -> None:
    """PostgreSQL ends this thread's session, as a restart of the database or of a pooler
    would: the statement asking fails, and so does every later one on that connection."""
    try:
        with connections[using].cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    except OperationalError:
        return
    raise AssertionError("the session outlived pg_terminate_backend()")
