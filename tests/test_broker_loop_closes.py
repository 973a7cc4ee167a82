"""The broker loop hands every connection close the guard reads to the core, whoever read it.

The guard reads its socket monitor in ``drain()`` but also in ``check()`` and ``cut()``; a close
read there must still reach the core on the next pass, not wait for the next monitor event (the
client's state would then linger until its heartbeat expiry, 3 s).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from pool.broker.server import Broker
from tests.support.waiting import wait_for
from worker import protocol as P


def _slowed(check):
    """``check`` after a 20 ms sleep: most of each pass is spent here, so a close's event arrives
    while check() is about to read the monitor, not while the loop waits in its poll."""

    def slow_check(now: float) -> list[int]:
        time.sleep(0.02)
        return check(now)

    return slow_check


@pytest.mark.timeout(30)
def test_a_close_read_by_the_guards_check_reaches_the_core_at_once() -> None:
    with tempfile.TemporaryDirectory() as folder:
        broker = Broker(f"ipc://{Path(folder) / 'broker.sock'}")
        broker.guard.check_interval = 0.0  # check() reads the monitor on every pass
        broker.guard.check = _slowed(broker.guard.check)  # type: ignore[method-assign]
        loop = threading.Thread(target=broker.serve_forever, daemon=True)
        loop.start()
        context = zmq.Context()
        client, chatter = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
        stop = threading.Event()

        def chat() -> None:  # another peer's chatter keeps the loop's poll returning at once
            while not stop.wait(0.001):
                chatter.send_multipart([P.PROTOCOL, P.HEARTBEAT])

        talker = threading.Thread(target=chat, daemon=True)
        try:
            for sock in (client, chatter):
                sock.linger = 0
                sock.connect(broker.endpoint)
            client.send_multipart([P.PROTOCOL, P.HELLO, P.encode_json(P.environment())])
            assert client.poll(10_000), "no WELCOME"
            assert client.recv_multipart()[1] == P.WELCOME
            talker.start()
            wait_for(lambda: broker.core.clients, 5, "the client to be registered")
            time.sleep(0.2)
            client.close()
            # Well inside the client's heartbeat expiry: only the close can have removed it.
            wait_for(lambda: not broker.core.clients, P.HEARTBEAT_EXPIRY * 2 / 3, "the closed client to be dropped")
            assert broker.core.counters["connections_closed"] >= 1
        finally:
            stop.set()
            if talker.is_alive():
                talker.join(5)
            client.close()
            chatter.close()
            broker.stop()
            loop.join(5)
            broker.close()
            context.term()
