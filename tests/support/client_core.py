"""The client's core driven by hand, with no socket, thread or clock: a ``Client`` that feeds
``ClientCore`` broker messages and caller calls at chosen times, and records what the core does
(messages sent, replies delivered to which sink, the shell's signals) as small records in one
log, in order. Used by tests/test_client_core.py.

``client.at(t)`` moves the clock; every other call happens at the current time. ``client.take()``
returns what the core did since the last ``take`` (and forgets it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pool.client.core import ClientCore, Reply, Submission
from worker import protocol as P
from worker.codec import digest

ADDRESS = "tcp://127.0.0.1:5555"
CONNECT_TIMEOUT = 5.0
RUNNABLE = b"a runnable's bytes"


@dataclass(frozen=True)
class Sent:
    """A message to the broker: its command and the frames after it."""

    command: bytes
    body: tuple[bytes, ...]


@dataclass(frozen=True)
class Delivered:
    """A reply handed to the sink named ``sink``."""

    sink: str
    reply: Reply


@dataclass(frozen=True)
class Signal:
    """``wake``, ``settled`` or ``unsettled``: what the core tells its shell."""

    name: str


class Sink:
    """A caller's sink that writes what it gets into the client's log under its name."""

    def __init__(self, name: str, log: list[Any]) -> None:
        self.name = name
        self._log = log
        self.replies: list[Any] = []

    def deliver(self, reply: Any) -> None:
        self.replies.append(reply)
        self._log.append(Delivered(self.name, reply))


class Client:
    """A core plus the time and a log of what it did."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT, strict: bool = True) -> None:
        self.now = 0.0
        self.log: list[Any] = []
        self.core = ClientCore(ADDRESS, connect_timeout, now=self.now, id_prefix=b"\0" * (P.TASK_ID_BYTES - 8),
                               send=lambda frames: self.log.append(Sent(frames[1], tuple(frames[2:]))),
                               wake=lambda: self.log.append(Signal("wake")),
                               settled=lambda: self.log.append(Signal("settled")),
                               unsettled=lambda: self.log.append(Signal("unsettled")), strict=strict)
        self._sinks = 0

    def at(self, now: float) -> Client:
        self.now = now
        return self

    def take(self) -> list[Any]:
        taken, self.log[:] = list(self.log), []
        return taken

    def sink(self, name: str | None = None) -> Sink:
        self._sinks += 1
        return Sink(name or f"sink-{self._sinks}", self.log)

    # ------------------------------------------------------------------ callers

    def submit(self, sink: Sink | None = None, *, kind: str = "invoke", timeout: float | None = None,
               retries: int = 0, input_blob: bytes = b"input", patience: float | None = None,
               runnable: bytes = RUNNABLE) -> tuple[bytes, Sink]:
        """Submit a task now; its caller's id and sink."""
        sink = sink or self.sink()
        task_id = self.core.new_task_id()
        header = P.TaskHeader(kind, digest(runnable), timeout=timeout, retries=retries).to_bytes()
        self.core.submit(Submission(task_id, header, digest(runnable), runnable, input_blob, sink,
                                    patience=patience), self.now)
        return task_id, sink

    def cancel(self, task_id: bytes) -> bool:
        return self.core.cancel(task_id, self.now)

    def tick(self, now: float) -> list[Any]:
        self.at(now).core.tick(now)
        return self.take()

    # ------------------------------------------------------------------ the broker

    def message(self, *frames: bytes, protocol: bytes = P.PROTOCOL) -> list[Any]:
        self.core.on_message([protocol, *frames], self.now)
        return self.take()

    def welcome(self, **info: Any) -> list[Any]:
        return self.message(P.WELCOME, P.encode_json({"workers": 1, **info}))

    def result(self, wire_id: bytes, output: bytes = b"output") -> list[Any]:
        return self.message(P.RESULT, wire_id, output)

    def chunk(self, wire_id: bytes, data: bytes = b"chunk") -> list[Any]:
        return self.message(P.CHUNK, wire_id, data)

    def error(self, wire_id: bytes, code: bytes, message: bytes = b"message", detail: bytes = b"") -> list[Any]:
        return self.message(P.ERROR, wire_id, code, message, detail)


def welcomed(*, strict: bool = True, **info: Any) -> Client:
    """A client whose broker has said WELCOME (with ``info``), its log empty; ``strict`` (the
    default in tests): a rule that raises is raised."""
    client = Client(strict=strict)
    client.welcome(**info)
    return client


def submits(effects: list[Any]) -> list[tuple[bytes, P.TaskHeader, bytes]]:
    """(wire id, header, runnable bytes sent) of every SUBMIT, in order."""
    return [(e.body[0], P.TaskHeader.from_bytes(e.body[1]), e.body[2])
            for e in effects if isinstance(e, Sent) and e.command == P.SUBMIT]


def commands(effects: list[Any]) -> list[bytes]:
    """The command of every message sent, in order."""
    return [e.command for e in effects if isinstance(e, Sent)]


def delivered(effects: list[Any]) -> list[tuple[str, bytes, str, bytes]]:
    """(sink, caller's task id, kind, data or error code) of every reply, in order."""
    return [(e.sink, e.reply.task_id, e.reply.kind, e.reply.code if e.reply.kind == "error" else e.reply.data)
            for e in effects if isinstance(e, Delivered)]


def signals(effects: list[Any]) -> list[str]:
    return [e.name for e in effects if isinstance(e, Signal)]
