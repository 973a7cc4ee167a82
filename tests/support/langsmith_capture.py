"""A local stand-in for the LangSmith API that records the runs the real ``langsmith`` client posts.

Tracing is tested the way users turn it on: ``LANGSMITH_TRACING=true``, ``LANGSMITH_ENDPOINT``,
``LANGSMITH_API_KEY`` in the environment, LangChain's own tracer, the real client and its background
thread. The LangSmith service cannot be reached from the test machines, so ``LangSmithCapture``
answers what the client sends, on 127.0.0.1:

* ``GET /info``: the server's configuration, saying "use the multipart endpoint" (what the real
  service says) and not offering zstd compression (so the parts arrive readable);
* ``POST /runs/multipart``: ``multipart/form-data`` whose parts are named ``post.<id>``,
  ``patch.<id>`` (a run's fields) and ``post.<id>.<field>`` (its inputs, outputs, extra...);
* ``POST /runs/batch`` (``{"post": [...], "patch": [...]}``), ``POST /runs`` and
  ``PATCH /runs/<id>``: the older JSON endpoints, for a client told not to use multipart.

Every run created or updated becomes one record (:class:`Record`): its id, trace id, parent, name,
run type, metadata, whether it has ended. :meth:`LangSmithCapture.runs` merges a run's records.

It also runs on its own, for a Pod in a cluster (standard library only, so any Python image with
this file mounted will do): ``python langsmith_capture.py --port 8080`` prints each record as one
JSON line on stdout, which ``kubectl logs`` reads back (:func:`parse_log`).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LangSmithCapture", "Record", "parse_log", "runs_of"]

# What a printed record line starts with (the Pod's log holds nothing else, but say so anyway).
LOG_PREFIX = "RUN "

API_KEY = "lsv2-capture-test-key"

# The answer to GET /info: the multipart endpoint, as the real service asks; no zstd_compression_enabled
# flag, so the client sends the parts uncompressed.
INFO = {
    "version": "0.0-capture",
    "batch_ingest_config": {"use_multipart_endpoint": True, "size_limit": 100, "size_limit_bytes": 20_971_520,
                            "scale_up_qsize_trigger": 1000, "scale_up_nthreads_limit": 16,
                            "scale_down_nempty_trigger": 4},
    "instance_flags": {},
}


@dataclass
class Record:
    """One create ("post") or update ("patch") of a run, as the client sent it."""

    op: str
    id: str
    trace_id: str | None = None
    parent_run_id: str | None = None
    name: str | None = None
    run_type: str | None = None
    dotted_order: str | None = None
    session_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    ended: bool = False

    @classmethod
    def of(cls, op: str, run: dict[str, Any], extra: dict[str, Any] | None = None) -> Record:
        extra = extra if extra is not None else (run.get("extra") or {})
        return cls(op=op, id=str(run.get("id")), trace_id=_text(run.get("trace_id")),
                   parent_run_id=_text(run.get("parent_run_id")), name=run.get("name"),
                   run_type=run.get("run_type"), dotted_order=run.get("dotted_order"),
                   session_name=run.get("session_name"), metadata=dict(extra.get("metadata") or {}),
                   ended=run.get("end_time") is not None)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def runs_of(records: Iterable[Record]) -> dict[str, Record]:
    """Each run once, by id: its create merged with its updates (a field an update leaves out keeps
    the value it was created with)."""
    merged: dict[str, Record] = {}
    for record in records:
        known = merged.get(record.id)
        if known is None:
            merged[record.id] = Record(**{**asdict(record), "metadata": dict(record.metadata)})
            continue
        for name in ("trace_id", "parent_run_id", "name", "run_type", "dotted_order", "session_name"):
            value = getattr(record, name)
            if value is not None:
                setattr(known, name, value)
        known.metadata.update(record.metadata)
        known.ended = known.ended or record.ended
    return merged


def parse_log(text: str) -> list[Record]:
    """The records a standalone capture server printed (``kubectl logs`` of its Pod)."""
    return [Record(**json.loads(line[len(LOG_PREFIX):])) for line in text.splitlines() if line.startswith(LOG_PREFIX)]


def _multipart_records(content_type: str, body: bytes) -> list[Record]:
    """The runs in a ``/runs/multipart`` body: ``<op>.<id>`` parts hold a run's fields,
    ``<op>.<id>.<field>`` parts one field each (of those, ``extra`` carries the metadata)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition") or ""
        op, _, rest = str(name).partition(".")
        if op not in ("post", "patch") or not rest:
            continue  # attachments and feedback are not runs
        run_id, _, field_name = rest.partition(".")
        value = json.loads(part.get_payload(decode=True) or b"null")
        run = runs.setdefault((op, run_id), {"id": run_id})
        if field_name:
            run[field_name] = value
        else:
            run.update(value)
    return [Record.of(op, run) for (op, _), run in runs.items()]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], capture: LangSmithCapture) -> None:
        self.capture = capture
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)) or self.capture._stopping.is_set():
            return  # a client dropping its keep-alive connection, or us closing it on shutdown
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.capture._connection(self.connection, opened=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.capture._connection(self.connection, opened=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:
        if self._path().endswith("/info"):
            self._reply(200, INFO)
        else:
            self._reply(404, {"detail": f"the capture server does not serve GET {self.path}"})

    def do_POST(self) -> None:
        body, path = self._body(), self._path()
        if self.headers.get("Content-Encoding"):
            self._reply(415, {"detail": "the capture server takes uncompressed bodies only"})
            return
        if path.endswith("/runs/multipart"):
            records = _multipart_records(self.headers.get("Content-Type") or "", body)
        elif path.endswith("/runs/batch"):
            data = json.loads(body or b"{}")
            records = [Record.of(op, run) for op in ("post", "patch") for run in data.get(op) or []]
        elif path.endswith("/runs"):
            records = [Record.of("post", json.loads(body))]
        else:
            self._reply(404, {"detail": f"the capture server does not serve POST {self.path}"})
            return
        self.server.capture._add(records)
        self._reply(202, {})

    def do_PATCH(self) -> None:
        body, path = self._body(), self._path()
        head, _, run_id = path.rpartition("/")
        if not head.endswith("/runs"):
            self._reply(404, {"detail": f"the capture server does not serve PATCH {self.path}"})
            return
        self.server.capture._add([Record.of("patch", {**json.loads(body or b"{}"), "id": run_id})])
        self._reply(202, {})


class LangSmithCapture:
    """An HTTP server on 127.0.0.1 (any free port) that records the runs LangSmith clients post.

    ``env()`` is what a process needs in its environment to trace to it. ``on_record``: called
    with each record as it arrives (the standalone server prints them)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 on_record: Callable[[Record], None] | None = None) -> None:
        self._address = (host, port)
        self._on_record = on_record
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the capture server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, project: str = "runnable-k8s-tests") -> dict[str, str]:
        """LangSmith tracing on, to this server, as a user would turn it on."""
        return {"LANGSMITH_TRACING": "true", "LANGSMITH_ENDPOINT": self.url, "LANGSMITH_API_KEY": API_KEY,
                "LANGSMITH_PROJECT": project}

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def runs(self) -> dict[str, Record]:
        return runs_of(self.records())

    def start(self) -> LangSmithCapture:
        self._stopping.clear()
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="langsmith-capture", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections.items())
        for conn, _ in connections:  # keep-alive connections the clients still hold
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, handler in connections:
            if handler is not threading.current_thread():
                handler.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LangSmithCapture:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add(self, records: list[Record]) -> None:
        with self._lock:
            self._records.extend(records)
        if self._on_record is not None:
            for record in records:
                self._on_record(record)

    def _connection(self, conn: socket.socket, opened: bool) -> None:
        with self._lock:
            if opened:
                self._connections[conn] = threading.current_thread()
            else:
                self._connections.pop(conn, None)


# Handler threads print concurrently: print() writes the text and its newline separately, and two
# records interleaved on one line ("RUN {...}RUN {...}") broke parse_log. One write per line, locked.
_PRINT_LOCK = threading.Lock()


def _print_record(record: Record) -> None:
    line = LOG_PREFIX + json.dumps(asdict(record)) + "\n"
    with _PRINT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record the runs LangSmith clients post; print each as a line.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    capture = LangSmithCapture(args.host, args.port, on_record=_print_record).start()
    print(f"capture server listening on {capture.url}", flush=True)
    assert capture._thread is not None
    try:
        capture._thread.join()
    except KeyboardInterrupt:
        capture.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
