"""A real broker process (``python -m pool broker``) on 127.0.0.1 without keys, for attacks on
its socket, and a plain client that says HELLO to it.

    with insecure_broker(max_message_bytes=8 * MiB) as broker:
        assert says_welcome(context, broker.endpoint)
        assert broker.process.poll() is None, broker.stderr()

The broker leaves with the test process (``--exit-with-parent``) and is stopped at the end; its
stderr goes to a temporary file (a pipe nobody reads could fill and stop it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import zmq

from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import stop_process
from worker import protocol as P


@dataclass
class BrokerProcess:
    endpoint: str
    process: subprocess.Popen[str]
    log: IO[str]

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


@contextlib.contextmanager
def insecure_broker(*, max_message_bytes: int) -> Iterator[BrokerProcess]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pool", "broker", "--bind", endpoint, "--insecure", "--announce",
             "--max-message-bytes", str(max_message_bytes), "--exit-with-parent", str(os.getpid())],
            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("READY"), f"the broker did not start: {line!r}"
            yield BrokerProcess(endpoint, process, log)
        finally:
            stop_process(process)


def hello_frames() -> list[bytes]:
    return [P.PROTOCOL, P.HELLO, P.encode_json(P.environment())]


def says_welcome(context: zmq.Context[Any], endpoint: str, *, routing_id: bytes | None = None,
                 timeout: float = 10.0) -> zmq.Socket[Any] | None:
    """A DEALER (with ``routing_id``, if given) that said HELLO and got WELCOME, or None. The
    caller closes it (or destroys the context)."""
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    if routing_id is not None:
        dealer.routing_id = routing_id
    dealer.connect(endpoint)
    dealer.send_multipart(hello_frames())
    if dealer.poll(int(timeout * 1000)):
        frames = dealer.recv_multipart()
        if frames[:2] == [P.PROTOCOL, P.WELCOME]:
            return dealer
    dealer.close(linger=0)
    return None
