"""The broker's outbox (pool/broker/outbox.py) against real ZeroMQ sockets: a ROUTER bound on
127.0.0.1 and DEALER peers that read, read slowly, never read, or are gone.

A peer that must not read ahead gets ``rcvhwm = 1`` and small kernel buffers on both ends, so
what ZeroMQ holds for it stays in the broker instead of being soaked up by the peer's own queue.
Clocks: ``flush(now)`` takes the time as an argument, so the no-progress rule is driven by a
made-up clock; the real clock only bounds how long a test may wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from pool.broker.outbox import Outbox
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(30)

LARGE = 128 * 1024  # over transport.COPY_THRESHOLD: sent zero-copy and tracked
SMALL = 100


class Sockets:
    """A ROUTER (the broker's settings: linger 0, ROUTER_MANDATORY, a finite SNDHWM) and its peers."""

    def __init__(self, sndhwm: int = 1000) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_mandatory = 1
        self.router.sndhwm = sndhwm  # before bind: libzmq applies it to connections accepted later
        self.router.sndbuf = 8192
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peers: list[zmq.Socket[Any]] = []

    def peer(self, *, reads_ahead: bool = True) -> tuple[zmq.Socket[Any], bytes]:
        """A connected DEALER and its identity on the ROUTER. ``reads_ahead=False``: ZeroMQ on its
        side takes one message at a time (rcvhwm 1, a small receive buffer)."""
        dealer = self.context.socket(zmq.DEALER)
        dealer.linger = 0
        if not reads_ahead:
            dealer.rcvhwm = 1
            dealer.rcvbuf = 8192
        dealer.connect(self.endpoint)
        self.peers.append(dealer)
        dealer.send(b"hello")
        assert self.router.poll(5000), "the ROUTER never heard from its peer"
        identity, _ = self.router.recv_multipart()
        return dealer, identity

    def close(self) -> None:
        for sock in [*self.peers, self.router]:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    s = Sockets()
    yield s
    s.close()


@pytest.fixture
def small_hwm() -> Iterator[Sockets]:
    s = Sockets(sndhwm=5)
    yield s
    s.close()


def message(seq: int, size: int) -> list[bytes]:
    return [b"R", b"%d" % seq, bytes(size)]


def seq_of(frames: list[bytes]) -> int:
    return int(frames[1])


def test_the_socket_must_have_a_finite_hwm() -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    try:
        router.sndhwm = 0
        with pytest.raises(ValueError, match="SNDHWM"):
            Outbox(router)
    finally:
        router.close(linger=0)
        context.term()


def test_order_is_kept_through_the_backlog(small_hwm: Sockets) -> None:
    """Large and small messages to a peer that does not read yet: the large ones past the
    in-flight budget and the small ones past SNDHWM wait; once it reads, all arrive in order."""
    dealer, peer = small_hwm.peer(reads_ahead=False)
    outbox = Outbox(small_hwm.router, max_unread_bytes=1024 * 1024, unread_timeout=60)
    total = 45
    for seq in range(total):
        assert outbox.send(peer, message(seq, LARGE if seq % 3 == 0 else SMALL), 0.0)
    assert outbox.has_backlog, "15 large messages (1.9 MiB) to a peer that reads nothing should not all fit"
    assert outbox.backlog_bytes > 0

    received: list[int] = []
    deadline = time.monotonic() + 20
    while len(received) < total and time.monotonic() < deadline:
        assert outbox.flush(1.0) == []
        if dealer.poll(20):
            received.append(seq_of(dealer.recv_multipart()))
    assert received == list(range(total))
    later = iter(range(2, 1_000_000))  # a later clock each time: flush's pass over in-flight peers runs
    wait_for(lambda: outbox.flush(float(next(later))) == [] and outbox.status()["unread_bytes"] == 0, 10,
             "the outbox to let go of every message")
    assert not outbox.has_backlog


def test_a_peer_that_never_reads_is_reported_with_bounded_bytes(sockets: Sockets) -> None:
    """Large replies to a peer that reads nothing: in flight up to M, then a backlog up to 2M in
    all; the next message stalls it, and flush reports it with what it left unread."""
    _, peer = sockets.peer(reads_ahead=False)
    budget = 512 * 1024
    outbox = Outbox(sockets.router, max_unread_bytes=budget, unread_timeout=60)
    reported: list[tuple[bytes, int]] = []
    most_held = 0
    for seq in range(100):
        assert outbox.send(peer, message(seq, LARGE), 0.0)
        held = outbox.unread_bytes(peer)
        most_held = max(most_held, held)
        assert outbox.in_flight_bytes <= budget  # M is the in-flight cap (L < M here)
        assert held <= 2 * budget  # max(2M, max(M, L) + L) = 2M when L <= M
        reported = outbox.flush(0.0)
        if reported:
            break
    assert reported, "a peer that reads nothing was never reported"
    [(who, unread)] = reported
    assert who == peer
    assert 2 * budget - LARGE < unread <= 2 * budget + LARGE + 100  # held + the message that did not fit
    assert most_held > budget  # the backlog was used before it was dropped
    status = outbox.status()
    assert status["backlog_bytes"] == 0  # let go at once
    assert status["in_flight_bytes"] <= budget  # what ZeroMQ still holds for the connected peer
    assert status["peers_stalled"] == 1 and status["messages_discarded"] == 1
    assert not outbox.has_backlog
    outbox.forget(peer)
    assert outbox.status()["unread_bytes"] == 0


def test_a_backlog_without_progress_is_reported_after_the_timeout(small_hwm: Sockets) -> None:
    """Small replies only: SNDHWM fills, later ones wait; nothing moves for unread_timeout s."""
    _, peer = small_hwm.peer(reads_ahead=False)
    outbox = Outbox(small_hwm.router, max_unread_bytes=1024 * 1024, unread_timeout=5.0)
    for seq in range(10_000):  # the kernel's buffers take a few dozen, then ZeroMQ's 5
        assert outbox.send(peer, message(seq, 1000), 100.0)
        if outbox.has_backlog:
            break
    assert outbox.has_backlog
    for _ in range(5):
        outbox.send(peer, message(0, 1000), 101.0)
    waiting = outbox.backlog_bytes
    assert outbox.flush(104.9) == []
    assert outbox.flush(105.1) == [(peer, waiting)]
    assert outbox.status()["backlog_bytes"] == 0
    assert outbox.flush(200.0) == []  # reported once


def test_a_slow_reader_is_not_dropped(sockets: Sockets) -> None:
    """A backlog that lasts far longer than unread_timeout (on the made-up clock, which moves on
    only when the peer took a message) is not a stall as long as the peer keeps reading."""
    dealer, peer = sockets.peer(reads_ahead=False)
    budget = 4 * LARGE
    timeout = 1.0
    outbox = Outbox(sockets.router, max_unread_bytes=budget, unread_timeout=timeout)
    total, sent, now = 40, 0, 0.0
    received: list[int] = []
    backlogged_time = 0.0
    deadline = time.monotonic() + 20
    while len(received) < total and time.monotonic() < deadline:
        # Replies come as fast as the broker's budget lets them: more than the peer reads at once.
        while sent < total and outbox.unread_bytes(peer) + LARGE <= 2 * budget:
            assert outbox.send(peer, message(sent, LARGE), now)
            sent += 1
        before = (outbox.in_flight_bytes, outbox.backlog_bytes)
        assert outbox.flush(now) == [], f"a reading peer was dropped at {now:.1f}"
        if (outbox.in_flight_bytes, outbox.backlog_bytes) != before:
            # The peer took something (flush let go of a written message or sent from the backlog):
            # time may pass, up to most of a timeout.
            if outbox.has_backlog:
                backlogged_time += 0.6 * timeout
            now += 0.6 * timeout
        if dealer.poll(10):
            received.append(seq_of(dealer.recv_multipart()))
    assert received == list(range(total))
    assert backlogged_time > 5 * timeout, "the test never kept a backlog for long"
    assert outbox.status()["peers_stalled"] == 0


def test_a_gone_peer_returns_false(sockets: Sockets) -> None:
    outbox = Outbox(sockets.router)
    assert outbox.send(b"\x00nobody", message(0, SMALL), 0.0) is False
    assert outbox.send(b"\x00nobody", message(0, LARGE), 0.0) is False
    dealer, peer = sockets.peer()
    assert outbox.send(peer, message(1, SMALL), 0.0) is True
    assert dealer.poll(5000) and seq_of(dealer.recv_multipart()) == 1
    dealer.close(linger=0)
    sockets.peers.remove(dealer)
    wait_for(lambda: outbox.send(peer, message(2, SMALL), 0.0) is False, 10, "the ROUTER to notice the peer left")
    assert outbox.send(peer, message(3, LARGE), 0.0) is False
    assert outbox.status()["unread_bytes"] == 0


def test_trackers_are_pruned_once_written(sockets: Sockets) -> None:
    dealer, peer = sockets.peer()
    outbox = Outbox(sockets.router, max_unread_bytes=64 * 1024 * 1024)
    for seq in range(8):
        assert outbox.send(peer, message(seq, LARGE), 0.0)
    assert 0 < outbox.in_flight_bytes <= 8 * (LARGE + 10)
    assert [seq_of(dealer.recv_multipart()) for _ in range(8)] == list(range(8))
    now = [0.0]

    def pruned() -> bool:
        now[0] += 1.0  # each flush a second later: its pass over the in-flight peers runs
        return outbox.flush(now[0]) == [] and outbox.in_flight_bytes == 0

    wait_for(pruned, 10, "the trackers of written messages to be pruned")
    assert outbox.unread_bytes(peer) == 0 and not outbox._peers


def test_forget_drops_the_backlog(sockets: Sockets) -> None:
    _, peer = sockets.peer(reads_ahead=False)
    outbox = Outbox(sockets.router, max_unread_bytes=4 * LARGE)
    for seq in range(7):  # under 2M in all: in flight up to M, the rest waits
        assert outbox.send(peer, message(seq, LARGE), 0.0)
    assert outbox.has_backlog and outbox.backlog_bytes > 0 and outbox.status()["peers_stalled"] == 0
    outbox.forget(peer)
    assert not outbox.has_backlog
    assert outbox.status()["unread_bytes"] == 0
    assert outbox.flush(1000.0) == []
