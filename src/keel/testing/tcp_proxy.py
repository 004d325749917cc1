"""A local TCP port forwarded to a server (PostgreSQL, Redis), which a test cuts to make an outage:

    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    proxy.port   # point the client here
    proxy.stop()   # the outage: every connection through it is cut, new ones are refused
    proxy.start()  # the recovery, on the same port

The server itself keeps running for everyone else (a machine's shared PostgreSQL, say). A cut is a
shutdown of both sockets of each connection, so a client holding one sees it end at once, as when
the server goes away; a new connection is refused (nothing listens), as when it is down.
"""

from __future__ import annotations

import socket
import threading
from typing import Self
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`, one thread per direction of each connection (a test's
    few connections, not a load)."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port  # 0: a free one, chosen by the first start and kept by the next ones
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._running = False
        self._lock = threading.Lock()  # `stop` against a connection being set up: none survives a cut

    def start(self) -> Self:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        self.port = server.getsockname()[1]
        server.listen(64)
        server.settimeout(0.05)  # the accept loop notices a stop this often
        with self._lock:
            self._server = server
            self._running = True
        threading.Thread(target=self._accept, args=(server,), name=f"tcp-proxy-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._running = False
            if self._server is not None:
                self._server.close()
                self._server = None
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _cut(sock)

    def url(self, url: str) -> str:
        """`url` (postgresql://, redis://) through this proxy: its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        return urlunsplit(parts._replace(netloc=f"{user + '@' if user else ''}127.0.0.1:{self.port}"))

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._running or self._server is not server:  # cut while it was being set up
                    _cut(client)
                    _cut(upstream)
                    return
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
