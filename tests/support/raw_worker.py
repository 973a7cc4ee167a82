"""A worker that is not ours: a raw DEALER speaking the real worker protocol to a real broker.

It registers with the environment it is given, heartbeats, counts the TASKs it receives and, when
given ``answer(task_id) -> [frames, ...]``, replies with whatever the test wants a hostile or
incompatible worker to send.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from worker import protocol as P


class RawWorker:
    def __init__(self, address: str, environment: dict[str, Any] | None = None,
                 answer: Callable[[bytes], list[list[bytes]]] | None = None) -> None:
        self.address = address
        self.environment = environment or {**P.environment(), "pid": os.getpid(), "concurrency": 4}
        self.answer = answer
        self.welcomed = threading.Event()
        self.answered = threading.Event()
        self.tasks_received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RawWorker:
        self._thread.start()
        assert self.welcomed.wait(10), "the broker did not welcome the raw worker"
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        try:
            sock.connect(self.address)
            sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json(self.environment)])
            while not self._stop.is_set():
                if sock.poll(200):
                    frames = sock.recv_multipart()
                    if frames[1] == P.WELCOME:
                        self.welcomed.set()
                    elif frames[1] == P.TASK:
                        self.tasks_received += 1
                        if self.answer is not None:
                            for message in self.answer(frames[2]):
                                sock.send_multipart(message)
                            self.answered.set()
                sock.send_multipart([P.PROTOCOL, P.HEARTBEAT])
            sock.send_multipart([P.PROTOCOL, P.BYE])
        finally:
            sock.close(linger=0)
            context.term()


@contextlib.contextmanager
def raw_dealer(address: str) -> Iterator[zmq.Socket]:
    """A bare DEALER connected to ``address``, in a context of its own, closed after."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        context.term()
