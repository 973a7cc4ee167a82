"""Routing-id pre-claim: a peer that takes the ROUTER's next automatic routing ids makes it abort.

A ROUTER gives a peer without a routing id ``0x00`` + a 32-bit counter starting at a value from
libc ``rand()``, which libzmq never seeds: ``0x6b8b4567`` (glibc) in every process. libzmq refuses
an explicit id that duplicates an explicit one, but not an automatic one that duplicates an
explicit one: it asserts (``Assertion failed: ok (src/socket_base.cpp:2113)``) and the process
dies of SIGABRT. The first test REPRODUCES THAT LIBZMQ BEHAVIOUR on a bare, unseeded ROUTER; the
second shows that ``pool.broker.connections.seed_routing_ids()`` before the ROUTER is created
takes the attack away; the third makes the attack on a real broker process.
"""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.support.broker_process import insecure_broker, keyed_broker, says_welcome
from tests.support.paths import REPO

UNSEEDED_START = 0x6B8B4567  # glibc's first rand() with no srand(): libzmq's first automatic id
CLAIMS = 4

# Everything in one child process: the ROUTER (bare: no guard, no options), the claimers and the
# ordinary DEALER. It prints "served <id>" if the ordinary DEALER's message reaches the ROUTER.
_SCRIPT = f"""
import sys
import zmq
if sys.argv[1] == "seed":
    from pool.broker.connections import seed_routing_ids
    seed_routing_ids()
context = zmq.Context()
router = context.socket(zmq.ROUTER)
router.linger = 0
port = router.bind_to_random_port("tcp://127.0.0.1")
claimed = []
for k in range({CLAIMS}):
    claimer = context.socket(zmq.DEALER)
    claimer.linger = 0
    claimer.routing_id = b"\\x00" + ({UNSEEDED_START} + k).to_bytes(4, "big")
    claimer.connect(f"tcp://127.0.0.1:{{port}}")
    claimer.send(b"claim")
    claimed.append(claimer)
for _ in range({CLAIMS}):
    assert router.poll(10_000), "a claimer's message did not arrive"
    assert router.recv_multipart()[1] == b"claim"
print("claimed", flush=True)
ordinary = context.socket(zmq.DEALER)
ordinary.linger = 0
ordinary.connect(f"tcp://127.0.0.1:{{port}}")
ordinary.send(b"hello")
assert router.poll(10_000), "the ordinary DEALER's message did not arrive"
peer, body = router.recv_multipart()
assert body == b"hello"
print("served", peer.hex(), flush=True)
context.destroy(linger=0)
"""


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.timeout(90)
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the predicted start is glibc's rand()")
def test_reproduction_preclaimed_automatic_ids_abort_an_unseeded_router() -> None:
    """REPRODUCTION of libzmq's behaviour (not of our code): the unseeded ROUTER dies of SIGABRT
    when the ordinary DEALER connects after the claims."""
    result = _run("no-seed")
    assert "claimed" in result.stdout, result.stderr
    assert result.returncode == -signal.SIGABRT, (result.returncode, result.stdout, result.stderr)
    assert "served" not in result.stdout
    assert "socket_base.cpp" in result.stderr


@pytest.mark.timeout(90)
def test_seeded_router_survives_the_preclaim_and_serves_the_ordinary_peer() -> None:
    result = _run("seed")
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    served = [line for line in result.stdout.splitlines() if line.startswith("served ")]
    assert served, result.stdout
    first_id = bytes.fromhex(served[0].split()[1])
    claimed = {b"\x00" + (UNSEEDED_START + k).to_bytes(4, "big") for k in range(CLAIMS)}
    assert len(first_id) == 5 and first_id[0] == 0 and first_id not in claimed


@pytest.mark.timeout(90)
@pytest.mark.parametrize("keys", [False, True], ids=["insecure", "curve"])
def test_the_broker_survives_a_preclaim_and_serves_an_ordinary_client(keys: bool, tmp_path: Path) -> None:
    """The same attack on ``runnable-k8s broker``: peers that took the unseeded ROUTER's next
    automatic ids (and said HELLO, so they are not cut as silent), then an ordinary client. The
    broker must be alive and answer the client's HELLO (an unseeded broker dies of SIGABRT). With
    CurveZMQ keys the claimers hold an allowed client key: a routing id travels after the
    handshake, so keys limit who can claim, not whether a claim works."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        with (keyed_broker(tmp_path) if keys else insecure_broker(max_message_bytes=8 * 1024 * 1024)) as broker:
            claimers = []  # kept: a claimer's socket collected would give its id back
            for k in range(CLAIMS):
                claimer = says_welcome(context, broker.endpoint, keys=broker.client_keys,
                                       routing_id=b"\x00" + (UNSEEDED_START + k).to_bytes(4, "big"))
                assert claimer is not None, f"claimer {k} got no WELCOME"
                claimers.append(claimer)
            client = says_welcome(context, broker.endpoint, keys=broker.client_keys)
            alive = broker.process.poll() is None
            assert alive, f"the broker died ({broker.process.returncode}): {broker.stderr()[-2000:]}"
            assert client is not None, "the ordinary client got no WELCOME"
    finally:
        context.destroy(linger=0)
