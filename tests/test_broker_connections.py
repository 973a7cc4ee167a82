"""The connection guard of the broker's ROUTER (pool/broker/connections.py), on real sockets.

The hostile peers are hand-written ZMTP over plain TCP (tests/support/zmtp_raw.py): a libzmq
DEALER never puts an unfinished multipart message on the wire, an attacker's program does. The
guarded ROUTER runs in a child process looping the way the broker does
(tests/support/guarded_router.py), so its memory is its own; one test makes the attack on a real
broker process (test_the_broker_cuts_a_never_ending_multipart_message_and_stays_bounded).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from pool.broker.connections import SLACK_BYTES, ConnectionGuard, cut, tcp_bytes_received
from tests.support.broker_process import hello_frames, insecure_broker, says_welcome
from tests.support.guarded_router import GuardedRouter, peak_rss_bytes
from tests.support.waiting import wait_for
from tests.support.zmtp_raw import RawPeer

MiB = 1024 * 1024
MAX_MESSAGE = 8 * MiB  # the guard's bound is this + SLACK_BYTES (8 MiB)
FRAME = b"x" * (64 * 1024)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads memory from /proc (Linux)")


def _echo(dealer: zmq.Socket[bytes], payload: bytes, timeout: float = 10.0) -> list[bytes]:
    dealer.send(payload)
    assert dealer.poll(int(timeout * 1000)), "the guarded router did not answer"
    return dealer.recv_multipart()


def _flood(peer: RawPeer, rate: float | None, limit: float) -> bool:
    """Frames that all say "more", at ``rate`` bytes/s (None: as fast as possible), until the
    connection breaks (True) or ``limit`` seconds pass (False)."""
    start = time.monotonic()
    try:
        while time.monotonic() - start < limit:
            peer.send_frame(FRAME, more=True)
            if rate is not None:
                ahead = peer.sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    except OSError:  # EPIPE / ECONNRESET: the guarded side ended the connection
        return True
    return False


@pytest.mark.timeout(90)
def test_a_never_ending_multipart_message_is_cut_and_memory_stays_bounded() -> None:
    """A peer that says hello, then sends 64 KiB frames that all say "more" at 128 MiB/s (a fast
    network's worth) for up to 8 s. Unguarded that is ~1 GiB held by the ROUTER; the guard (bound
    8 + 8 MiB, a look every 0.25 s) cuts it once past the bound: the ROUTER's peak resident memory
    grows by less than 160 MiB (2 * bound + twice 0.25 s at 128 MiB/s is 96 MiB, the rest is
    room for a loaded machine), and the ROUTER goes on serving others."""
    with GuardedRouter(max_message_bytes=MAX_MESSAGE) as router:
        peer = RawPeer("127.0.0.1", router.port)
        peer.send_message([b"hello"])
        router.wait_line(lambda w: w[0] == "message", 10, "the hostile peer's hello")
        before = peak_rss_bytes(router.pid)
        broken = _flood(peer, rate=128 * MiB, limit=8)
        sent = peer.sent
        assert broken or peer.closed(5), f"the flooding peer was never disconnected ({sent / MiB:.0f} MiB sent)"
        peer.close()
        cut_line = router.wait_line(lambda w: w[0] == "cut", 10, "the guard to cut the flood")
        assert cut_line[2] == "unfinished"
        router.wait_line(lambda w: w[0] == "closed" and w[1] == cut_line[1], 10, "the monitor to see the cut")
        growth = peak_rss_bytes(router.pid) - before
        print(f"cut after {sent / MiB:.0f} MiB sent; peak RSS grew {growth / MiB:.0f} MiB")
        assert sent > MAX_MESSAGE + SLACK_BYTES, "cut before the bound was passed"
        assert growth < 160 * MiB, f"the ROUTER grew {growth / MiB:.0f} MiB"

        context = zmq.Context()
        try:
            dealer = context.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.connect(router.endpoint)
            assert _echo(dealer, b"still there?") == [b"echo", b"12"]
        finally:
            context.destroy(linger=0)
        assert len(router.found("cut")) == 1


@pytest.mark.timeout(60)
def test_a_flood_at_full_speed_is_cut_too() -> None:
    """The same attack as fast as this machine sends: still cut, the sender sees the end."""
    with GuardedRouter(max_message_bytes=MAX_MESSAGE) as router:
        peer = RawPeer("127.0.0.1", router.port)
        peer.send_message([b"hello"])
        broken = _flood(peer, rate=None, limit=20)
        assert broken or peer.closed(5), f"never disconnected after {peer.sent / MiB:.0f} MiB"
        peer.close()
        assert router.wait_line(lambda w: w[0] == "cut", 10, "the cut")[2] == "unfinished"


@pytest.mark.timeout(60)
def test_a_silent_connection_is_cut_and_a_speaking_one_is_not() -> None:
    """Grace 1 s: a peer that completes the handshake and says nothing is cut (and sees its
    connection end); a DEALER that speaks every 0.3 s is served throughout."""
    with GuardedRouter(max_message_bytes=MAX_MESSAGE, silent_grace=1.0) as router:
        context = zmq.Context()
        try:
            talker = context.socket(zmq.DEALER)
            talker.linger = 0
            talker.connect(router.endpoint)
            _echo(talker, b"hi")
            talker_fd = router.wait_line(lambda w: w[0] == "message", 10, "the talker's message")[1]
            silent = RawPeer("127.0.0.1", router.port)
            started = time.monotonic()
            while time.monotonic() - started < 4:
                assert _echo(talker, b"tick") == [b"echo", b"4"]
                time.sleep(0.3)
            assert silent.closed(5), "the silent connection was not cut"
            silent.close()
            cuts = router.found("cut")
            assert [words[2] for words in cuts] == ["silent"], cuts
            assert cuts[0][1] != talker_fd
            assert _echo(talker, b"after") == [b"echo", b"5"]
        finally:
            context.destroy(linger=0)


@pytest.mark.timeout(60)
def test_a_legitimate_large_message_sent_slowly_is_not_cut() -> None:
    """An 8 MiB frame (the largest message allowed here) arriving over ~3 s spans a dozen looks
    with nothing delivered: it is under the bound, so it is received, not cut."""
    with GuardedRouter(max_message_bytes=MAX_MESSAGE) as router:
        peer = RawPeer("127.0.0.1", router.port)
        peer.send_message([b"hello"])
        peer.send_frame(b"p" * MAX_MESSAGE, more=False, pause_every=256 * 1024, pause=0.1)
        router.wait_line(lambda w: w[0] == "message" and w[2] == str(MAX_MESSAGE), 20, "the large message")
        assert not peer.closed(0.5)
        assert router.found("cut") == []
        peer.close()


@pytest.mark.timeout(60)
def test_a_burst_of_whole_messages_beyond_the_bound_is_not_cut() -> None:
    """40 MiB of 1 MiB messages at once (more than the 16 MiB bound, queued ahead of the loop): whole
    messages keep arriving, so nothing is cut and every one is answered."""
    with GuardedRouter(max_message_bytes=MAX_MESSAGE) as router:
        context = zmq.Context()
        try:
            dealer = context.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.sndhwm = 0
            dealer.connect(router.endpoint)
            payload = b"b" * MiB
            for _ in range(40):
                dealer.send(payload)
            for _ in range(40):
                assert dealer.poll(20_000), "a message of the burst was not answered"
                assert dealer.recv_multipart() == [b"echo", str(MiB).encode()]
            time.sleep(0.6)  # two more looks
            assert router.found("cut") == []
        finally:
            context.destroy(linger=0)


def _speak(dealer: zmq.Socket[Any], endpoint: str, router: zmq.Socket[Any], guard: ConnectionGuard) -> int:
    """Connect ``dealer``, send one message, read it on ``router`` as the broker's loop would
    (noted with the guard) and return the descriptor of its connection."""
    dealer.connect(endpoint)
    dealer.send(b"hello")
    assert router.poll(10_000)
    frames = router.recv_multipart(copy=False)
    fd: int = frames[1].get(zmq.SRCFD)
    guard.note(fd, len(frames[1]))
    return fd


@pytest.fixture(params=["tcp", "ipc"])
def guarded(request: pytest.FixtureRequest) -> Iterator[tuple[zmq.Context[Any], zmq.Socket[Any], ConnectionGuard, str]]:
    """A ROUTER with a guard, in this process, on tcp or on ipc (a socket file in a private
    folder, removed at the end)."""
    context: zmq.Context[Any] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    guard = ConnectionGuard(router, MAX_MESSAGE)
    folder = tempfile.mkdtemp(prefix="rk8s-guard-")  # short: an ipc path has at most 107 bytes
    try:
        if request.param == "tcp":
            endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            endpoint = f"ipc://{folder}/router"
            router.bind(endpoint)
        yield context, router, guard, endpoint
    finally:
        guard.close()
        context.destroy(linger=0)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(30)
def test_cut_ends_a_live_connection_and_drain_reports_it(
        guarded: tuple[zmq.Context[Any], zmq.Socket[Any], ConnectionGuard, str]) -> None:
    """tcp and ipc: the DEALER sees its connection end, the guard's drain() reports it, nothing
    more gets through, and a second cut of the same descriptor does nothing."""
    context, router, guard, endpoint = guarded
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.reconnect_ivl = -1  # once cut, stay cut (so the descriptor does not come back)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    fd = _speak(dealer, endpoint, router, guard)
    guard.drain()
    assert fd in guard.live
    if tcp_bytes_received(fd) is not None:  # Linux: the kernel counted the greeting, READY and hello
        assert tcp_bytes_received(fd) >= len(b"hello")

    assert guard.cut(fd)
    assert monitor.poll(10_000), "the DEALER never saw its connection end"
    wait_for(lambda: fd in guard.drain(), 10, "the guard's monitor to report the cut connection")
    assert fd not in guard.live
    try:
        dealer.send(b"lost", zmq.NOBLOCK)
    except zmq.Again:  # no connection left to queue it on
        pass
    assert not router.poll(500), "a message got through a cut connection"
    monitor.close(linger=0)

    assert not guard.cut(fd), "cut a connection that is gone"
    assert guard.cut_counts["asked"] == 1


@pytest.mark.timeout(30)
def test_cut_of_a_dead_or_foreign_descriptor_does_nothing() -> None:
    read_end, write_end = os.pipe()
    try:
        cut(read_end)  # not a socket: left alone
        os.write(write_end, b"ok")
        assert os.read(read_end, 2) == b"ok"
    finally:
        os.close(read_end)
        os.close(write_end)
    cut(read_end)  # closed: nothing to do, nothing raised
    assert tcp_bytes_received(read_end) is None


@pytest.mark.timeout(90)
def test_the_broker_cuts_a_never_ending_multipart_message_and_stays_bounded() -> None:
    """The same attack on ``runnable-k8s broker --insecure --max-message-bytes 8 MiB``: HELLO, then
    frames that all say "more" at 128 MiB/s for up to 8 s. The broker cuts the connection, its
    peak resident memory grows by less than 160 MiB (unguarded: ~1 GiB), and it still welcomes
    an ordinary client."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        with insecure_broker(max_message_bytes=MAX_MESSAGE) as broker:
            port = int(broker.endpoint.rsplit(":", 1)[1])
            peer = RawPeer("127.0.0.1", port)
            peer.send_message(hello_frames())
            assert not peer.closed(1.0)  # its WELCOME (read and dropped); the connection stays
            before = peak_rss_bytes(broker.process.pid)
            broken = _flood(peer, rate=128 * MiB, limit=8)
            sent = peer.sent
            assert broken or peer.closed(5), f"the broker never cut the flood ({sent / MiB:.0f} MiB sent)"
            peer.close()
            growth = peak_rss_bytes(broker.process.pid) - before
            print(f"broker cut the flood after {sent / MiB:.0f} MiB; its peak RSS grew {growth / MiB:.0f} MiB")
            assert growth < 160 * MiB, f"the broker grew {growth / MiB:.0f} MiB"
            assert broker.process.poll() is None, broker.stderr()[-2000:]
            assert says_welcome(context, broker.endpoint) is not None, "an ordinary client got no WELCOME"
    finally:
        context.destroy(linger=0)


@pytest.mark.timeout(30)
def test_the_silent_rule_holds_on_tcp_and_ipc(
        guarded: tuple[zmq.Context[Any], zmq.Socket[Any], ConnectionGuard, str]) -> None:
    context, router, guard, endpoint = guarded
    guard.silent_grace = 0.5
    silent = context.socket(zmq.DEALER)
    silent.linger = 0
    silent.connect(endpoint)
    wait_for(lambda: guard.drain() or guard.live, 10, "the silent connection to be accepted")
    (silent_fd,) = guard.live
    talker = context.socket(zmq.DEALER)
    talker.linger = 0
    _speak(talker, endpoint, router, guard)
    assert guard.check(time.monotonic()) == []
    time.sleep(0.6)
    assert guard.check(time.monotonic()) == [silent_fd]
    assert guard.reasons == {silent_fd: "silent"}
    assert guard.cut(silent_fd)
    assert guard.cut_counts["silent"] == 1
    wait_for(lambda: silent_fd in guard.drain(), 10, "the cut silent connection to be reported closed")
