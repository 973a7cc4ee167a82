"""What the connection guard costs the broker's loop, measured on this machine.

    python -m tests.support.guard_costs

Prints, per message: ``frame.get(zmq.SRCFD)``, ``frame.get("User-Id")`` (CurveZMQ with pyzmq's
authenticator, as the broker runs with keys) and ``ConnectionGuard.note``; per live connection:
one ``ConnectionGuard.check``. Figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from pool.broker.connections import ConnectionGuard


def per_call(fn: Callable[[], object], count: int) -> float:
    """Nanoseconds per call of ``fn``, the best of five runs of ``count`` calls."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(count):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / count)
    return best


def main() -> None:
    context: zmq.Context[Any] = zmq.Context()
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    server_public, server_secret = zmq.curve_keypair()
    router = context.socket(zmq.ROUTER)
    router.curve_server, router.curve_secretkey, router.curve_publickey = True, server_secret, server_public
    guard = ConnectionGuard(router, 64 * 1024 * 1024, check_interval=0.0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.curve_serverkey = server_public
    dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([b"RK8S/2", b".", b"body"])
    assert router.poll(10_000)
    frames = router.recv_multipart(copy=False)
    frame = frames[1]
    fd, user = frame.get(zmq.SRCFD), frame.get("User-Id")
    print(f"SRCFD {fd}, User-Id {user!r}")
    n = 200_000
    srcfd = per_call(lambda: frame.get(zmq.SRCFD), n)
    user_id = per_call(lambda: frame.get("User-Id"), n)
    note = per_call(lambda: guard.note(fd, 100), n)
    print(f"per message: frame.get(SRCFD) {srcfd:.0f} ns, frame.get('User-Id') {user_id:.0f} ns, "
          f"guard.note {note:.0f} ns")

    extra = []
    for _ in range(199):
        peer = context.socket(zmq.DEALER)
        peer.curve_serverkey = server_public
        peer.curve_publickey, peer.curve_secretkey = zmq.curve_keypair()
        peer.connect(f"tcp://127.0.0.1:{port}")
        peer.send(b"hi")
        extra.append(peer)
    deadline = time.monotonic() + 30
    while len(guard.live) < 200 and time.monotonic() < deadline:
        guard.drain()
        time.sleep(0.05)
    live = len(guard.live)
    check = per_call(lambda: guard.check(time.monotonic()), 200)
    print(f"per look: guard.check over {live} live tcp connections {check / 1000:.0f} us "
          f"({check / live / 1000:.2f} us a connection)")

    for peer in [*extra, dealer]:
        peer.close(linger=0)
    guard.close()
    router.close(linger=0)
    auth.stop()
    context.term()


if __name__ == "__main__":
    main()
