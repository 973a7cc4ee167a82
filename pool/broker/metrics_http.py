"""The broker's metrics HTTP server: ``GET /metrics`` (Prometheus text) and ``GET /scaling`` (JSON
for KEDA's ``metrics-api`` scaler), nothing else.

It listens where anyone the NetworkPolicy lets in can reach it, and it runs inside the broker's
process, so what a peer sends it is bounded: a request line and headers of at most
``MAX_REQUEST_BYTES`` (else 431), all of them within ``REQUEST_SECONDS`` (else the connection is
closed: a slowloris client holds a thread for that long, no longer), at most ``MAX_CONNECTIONS``
handled at once (more are closed unanswered, never queued as threads), a body never read, and
every method but GET answered 405. A scrape costs one snapshot's formatting: the numbers come from
the broker's status taken on its own thread every tick.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("runnable_k8s.metrics")

MAX_REQUEST_BYTES = 16 * 1024  # a scrape's request line and headers are a few hundred bytes
REQUEST_SECONDS = 5.0  # Prometheus and KEDA send their whole request at once
MAX_CONNECTIONS = 16  # scrapers are a handful; a flood is closed, not given threads

Body = tuple[bytes, str]  # (content, content type)


class _CappedReader:
    """The request's reader, straight off the socket: at most ``limit`` bytes, and only until
    ``deadline`` (monotonic).

    Past the byte limit a line comes back cut short and ``exhausted`` is set (the handler answers
    431); past the deadline a read raises ``TimeoutError``, which the stdlib handler turns into a
    closed connection. Every ``recv`` waits at most the time left, so a peer trickling a byte at a
    time cannot stretch the request (a buffered ``readline`` would wait for its newline forever)."""

    def __init__(self, sock: socket.socket, limit: int, deadline: float) -> None:
        self.sock = sock
        self.left = limit
        self.deadline = deadline
        self.buffer = bytearray()
        self.exhausted = False

    def readline(self, size: int = -1) -> bytes:
        size = 1 << 30 if size is None or size < 0 else size
        while True:
            end = self.buffer.find(b"\n", 0, size)
            if end >= 0 or len(self.buffer) >= size:
                cut = end + 1 if end >= 0 else size
                line = bytes(self.buffer[:cut])
                del self.buffer[:cut]
                return line
            if self.left <= 0:
                self.exhausted = True
                line = bytes(self.buffer)
                self.buffer.clear()
                return line
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the request took too long")
            self.sock.settimeout(remaining)
            data = self.sock.recv(min(4096, self.left))
            if not data:  # the peer closed: what there is
                line = bytes(self.buffer)
                self.buffer.clear()
                return line
            self.left -= len(data)
            self.buffer += data

    def read(self, size: int = -1) -> bytes:  # a GET's body is never read; this is for the stdlib's sake
        return b""

    def close(self) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    server_version = "runnable-k8s-metrics"
    sys_version = ""
    rfile: Any

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the buffered reader would wait for a newline however slowly it comes
        self.rfile = _CappedReader(self.connection, MAX_REQUEST_BYTES, time.monotonic() + REQUEST_SECONDS)

    def parse_request(self) -> bool:
        if self.rfile.exhausted:  # the request line alone was too long
            self.request_version, self.requestline, self.command = "HTTP/1.0", "", ""
            self._refuse(431, "the request is larger than this endpoint reads")
            return False
        if not super().parse_request():
            return False
        if self.rfile.exhausted:
            self._refuse(431, "the request's headers are larger than this endpoint reads")
            return False
        self.connection.settimeout(REQUEST_SECONDS)  # for writing the answer
        if self.command != "GET":
            self._refuse(405, "only GET: /metrics (Prometheus) or /scaling (JSON)", allow="GET")
            return False
        return True

    def _refuse(self, code: int, text: str, allow: str | None = None) -> None:
        self.close_connection = True
        body = (text + "\n").encode()
        self.send_response(code)
        if allow:
            self.send_header("Allow", allow)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            self._refuse(404, "not found: GET /metrics (Prometheus) or /scaling (JSON)")
            return
        body, content_type = route(self.headers.get("Accept", ""))
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # a scrape a second is not news
        pass


class MetricsHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``MAX_CONNECTIONS`` requests in hand at once."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64  # a burst of connections is accepted (then served or closed), not left in SYN limbo

    def __init__(self, address: tuple[str, int], routes: dict[str, Callable[[str], Body]]) -> None:
        self.routes = routes
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once, no thread, no queue
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that resets or times out is not the broker's error: a debug line, no traceback."""
        log.debug("metrics request from %s ended badly", client_address, exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(routes: dict[str, Callable[[str], Body]], port: int, bind: str = "127.0.0.1") -> MetricsHTTPServer:
    """Start serving ``routes`` (path -> function of the Accept header) on a daemon thread."""
    server = MetricsHTTPServer((bind, port), routes)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
