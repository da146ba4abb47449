"""A loopback TCP proxy that holds back a server's replies: a slow network or a stalled host.

``DelayProxy(target_port)`` listens on a chaos port and forwards every connection to
``127.0.0.1:target_port``; what the server sends back is held for :attr:`DelayProxy.delay`
seconds before it is passed on (requests go through at once). The delay can be changed
at any time and applies to the next reply. Threads, one pair per connection.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress

from .servers import chaos_port, release_port

__all__ = ["DelayProxy"]


class DelayProxy:
    """Forwards loopback connections to ``target_port``, delaying the replies by :attr:`delay` seconds."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = chaos_port()
        self.delay = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(128)
        self._spawn(self._accept)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _spawn(self, target: object, *args: object) -> None:
        assert callable(target)
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            self._spawn(self._pump, client, upstream, False)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if delayed and self.delay > 0 and self._closed.wait(self.delay):  # the injected fault
                    break  # closing: stop holding the reply
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop listening, cut every connection, and give the port back."""
        self._closed.set()
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
            threads = list(self._threads)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(timeout=5)
        release_port(self.port)
