"""A real broker process (``python -m pool broker``) on 127.0.0.1, without keys or with keys made
by ``pool.keys.create_key_directory``, for attacks on its socket, and a plain client that says
HELLO to it.

    with insecure_broker(max_message_bytes=8 * MiB) as broker:
        assert says_welcome(context, broker.endpoint)
        assert broker.process.poll() is None, broker.stderr()

    with keyed_broker(tmp_path) as broker:      # broker.client_keys: the "default" client's keys
        assert says_welcome(context, broker.endpoint, keys=broker.client_keys)

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
from pathlib import Path
from typing import IO, Any

import zmq

from pool.keys import DEFAULT_CLIENT, create_key_directory
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import stop_process
from worker import protocol as P
from worker.curve import PeerKeys, load_peer_keys


@dataclass
class BrokerProcess:
    endpoint: str
    process: subprocess.Popen[str]
    log: IO[str]
    client_keys: PeerKeys | None = None

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


@contextlib.contextmanager
def _broker(options: list[str], client_keys: PeerKeys | None = None) -> Iterator[BrokerProcess]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pool", "broker", "--bind", endpoint, "--announce", *options,
             "--exit-with-parent", str(os.getpid())],
            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("READY"), f"the broker did not start: {line!r}"
            yield BrokerProcess(endpoint, process, log, client_keys)
        finally:
            stop_process(process)


@contextlib.contextmanager
def insecure_broker(*, max_message_bytes: int) -> Iterator[BrokerProcess]:
    with _broker(["--insecure", "--max-message-bytes", str(max_message_bytes)]) as broker:
        yield broker


@contextlib.contextmanager
def keyed_broker(folder: Path) -> Iterator[BrokerProcess]:
    """A broker with CurveZMQ keys made in ``folder`` (a test's tmp_path), and its default client's."""
    keys = create_key_directory(folder / "keys")
    client_keys = load_peer_keys(keys / "clients" / DEFAULT_CLIENT, "client")
    with _broker(["--keys", str(keys / "broker")], client_keys) as broker:
        yield broker


def hello_frames() -> list[bytes]:
    return [P.PROTOCOL, P.HELLO, P.encode_json(P.environment())]


def says_welcome(context: zmq.Context[Any], endpoint: str, *, routing_id: bytes | None = None,
                 keys: PeerKeys | None = None, timeout: float = 10.0) -> zmq.Socket[Any] | None:
    """A DEALER (with ``routing_id`` and CurveZMQ ``keys``, if given) that said HELLO and got
    WELCOME, or None. The caller closes it (or destroys the context)."""
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    if keys is not None:
        keys.apply(dealer)
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
