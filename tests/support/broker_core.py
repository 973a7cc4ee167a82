"""The broker's core driven by hand, with no process, socket or clock: a ``Pool`` that feeds
``BrokerCore`` events at chosen times, and readers of the messages it returns. Shared by the
broker-core tests (tests/test_broker_core.py, _batch_slots, _callback_events, _tenants, _identity).

Each routing id is one connection unless a test says otherwise: an event without a connection
(``fd`` -1) gets the one its peer was first seen on, and its key; ``pool.connect(peer, key=...)``
opens a new connection under that routing id (a peer that reconnected with a chosen id)."""

from __future__ import annotations

import os
from typing import Any

from pool.broker import events as E
from pool.broker.core import BrokerCore
from worker import protocol as P
from worker.codec import digest

ENV = {"protocol": P.PROTOCOL_VERSION, "python": "3.11", "langchain_core": "1.7", "cloudpickle": "3.1",
       "host": "test"}
OTHER_ENV = {**ENV, "python": "3.12"}
RUNNABLE = b"a runnable's bytes"
OTHER_RUNNABLE = b"another runnable's bytes"
CLIENT = b"client-1"


def new_id() -> bytes:
    return os.urandom(P.TASK_ID_BYTES)


class Pool:
    """A core plus the time: ``pool(event)`` applies it now; ``pool.at(t)`` moves the clock."""

    def __init__(self, **settings: Any) -> None:
        self.now = 0.0
        # strict: a rule that raises fails the test (a production core would count it and go on).
        self.core = BrokerCore(now=self.now, **{"strict": True, **settings})
        self.fds: dict[bytes, int] = {}  # routing id -> its connection now
        self.keys: dict[bytes, bytes | None] = {}  # routing id -> the key that connection has
        self._next_fd = 100

    def __call__(self, event: E.Event) -> list[E.Effect]:
        if isinstance(event, E.FromPeer) and event.fd == -1:
            if event.peer not in self.fds:
                self.connect(event.peer, event.key)
            event.fd = self.fds[event.peer]
            if event.key is None:
                event.key = self.keys[event.peer]
        return self.core.handle(event, self.now)

    def connect(self, peer: bytes, key: bytes | None = None) -> int:
        """A new connection under routing id ``peer`` (authenticated with ``key``); its fd."""
        self._next_fd += 1
        self.fds[peer], self.keys[peer] = self._next_fd, key
        return self._next_fd

    def at(self, now: float) -> Pool:
        self.now = now
        return self

    def tick(self, now: float, client: bytes = CLIENT) -> list[E.Effect]:
        """A tick at ``now`` for a client that kept heartbeating until then."""
        self.at(now)(E.Heartbeat(client))
        return self(E.Tick())

    def hello(self, client: bytes = CLIENT, environment: dict[str, Any] = ENV,
              key: bytes | None = None) -> list[E.Effect]:
        return self(E.Hello(client, environment, key=key))

    def ready(self, worker: bytes, slots: int = 1, environment: dict[str, Any] = ENV,
              key: bytes | None = None, **more: Any) -> list[E.Effect]:
        return self(E.Ready(worker, {**environment, "concurrency": slots, **more}, key=key))

    def submit(self, task_id: bytes, client: bytes = CLIENT, runnable: bytes = RUNNABLE, *,
               timeout: float | None = None, retries: int = 0, send_bytes: bool = True,
               config: dict[str, Any] | None = None, trust: bool = False,
               input_blob: bytes = b"input") -> list[E.Effect]:
        header = P.TaskHeader("invoke", digest(runnable), timeout=timeout, retries=retries, config=config or {},
                              trust=trust).to_bytes()
        return self(E.Submit(client, task_id, header, runnable if send_bytes else b"", input_blob))

    def result(self, worker: bytes, task_id: bytes) -> list[E.Effect]:
        return self(E.Result(worker, task_id, b"output"))

    def error(self, worker: bytes, task_id: bytes, code: bytes) -> list[E.Effect]:
        return self(E.WorkerError(worker, task_id, code, (task_id, code, b"message", b"")))


def sent(effects: list[E.Effect]) -> list[tuple[bytes, bytes, list[bytes]]]:
    """(peer, command, body) of every message, in order."""
    return [(e.peer, e.frames[1], e.frames[2:]) for e in effects if isinstance(e, E.Send)]


def tasks_sent(effects: list[E.Effect]) -> list[tuple[bytes, bytes]]:
    """(worker, task id) of every TASK."""
    return [(peer, body[0]) for peer, command, body in sent(effects) if command == P.TASK]


def errors_sent(effects: list[E.Effect]) -> list[tuple[bytes, bytes, bytes]]:
    """(peer, task id, code) of every ERROR."""
    return [(peer, body[0], body[1]) for peer, command, body in sent(effects) if command == P.ERROR]


def task_frames(effects: list[E.Effect], task_id: bytes) -> list[bytes]:
    (body,) = [body for _, command, body in sent(effects) if command == P.TASK and body[0] == task_id]
    return body
