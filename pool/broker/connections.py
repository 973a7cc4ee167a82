"""A handle on the broker's individual connections, which libzmq's ROUTER socket does not give.

A ROUTER hides its connections behind routing ids, and three abuses follow from that:

* **Routing-id pre-claim.** A peer that sets no routing id gets an automatic one: ``0x00`` and a
  32-bit counter that starts at a value drawn from libc ``rand()`` when the ROUTER is created.
  libzmq never seeds ``rand()``, so the start is the same in every process (``0x6b8b4567`` with
  glibc). A peer that connects with its routing id set to the next automatic ids makes the ROUTER
  abort (``Assertion failed: ok (src/socket_base.cpp:2113)``) when an ordinary peer connects next:
  libzmq refuses an explicit id that duplicates another explicit one, not an automatic one.
  :func:`seed_routing_ids` makes the start secret.
* **An unfinished multipart message.** libzmq keeps every frame of a message until its last frame
  arrives. ``MAXMSGSIZE`` bounds one frame and the high-water mark counts whole messages, so a
  peer whose frames all say "more" grows the broker without limit. :class:`ConnectionGuard` sees
  it from outside: the kernel's count of bytes received on the connection (Linux ``TCP_INFO``)
  runs ahead of the bytes the broker was handed as whole messages.
* **Revocation.** CurveZMQ checks a key only at the handshake, and a ROUTER cannot drop one peer.
  :func:`cut` ends one connection through its file descriptor (a reset, for tcp on Linux).

What pyzmq does give: every received frame names the descriptor of the connection it came from
(``frame.get(zmq.SRCFD)``), and a socket monitor reports each accepted and each ended connection
with its descriptor. The guard keeps the live descriptors from the monitor; the broker's loop
tells it how many bytes each connection delivered (:meth:`ConnectionGuard.note`) and, on every
pass, asks which connections to cut (:meth:`ConnectionGuard.check`).

Portability: the byte accounting needs Linux (``TCP_INFO``'s ``tcpi_bytes_received``, kernel
4.1 or later); elsewhere (macOS, for one) unfinished messages are not detected, and the rest (the
silent-connection rule, :func:`cut`, seeding) works on any POSIX system. ipc:// connections have
no kernel byte count either: only the silent-connection rule applies to them.

Not thread-safe: the broker's loop thread owns the guard, like the socket.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import stat
import struct
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

__all__ = [
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_SILENT_GRACE",
    "SLACK_BYTES",
    "ConnectionGuard",
    "cut",
    "seed_routing_ids",
    "tcp_bytes_received",
]

log = logging.getLogger("runnable_k8s.broker")

DEFAULT_CHECK_INTERVAL = 0.25
"""Seconds between two looks at the connections. An unfinished message grows by whatever the peer
can send in that time before it is seen, so shorter is tighter; each look costs a few
microseconds per live connection."""

DEFAULT_SILENT_GRACE = 10.0
"""Seconds a new connection may stay without sending a whole message. Clients say HELLO and
workers READY as soon as their handshake is done, then heartbeat every second."""

SLACK_BYTES = 8 * 1024 * 1024
"""What a connection may receive beyond ``max_message_bytes`` without delivering a message: the
1 MiB the broker lets a frame exceed ``max_message_bytes`` by (``MAXMSGSIZE``), whole messages
still in the kernel's receive queue while libzmq's I/O thread lags (Linux lets that queue grow
to 6 MiB by default), the framing of a message (2 or 9 bytes a frame, plus 33 under CURVE), the
handshake and ZMTP heartbeats."""

# struct tcp_info (linux/tcp.h): the u64 tcpi_bytes_received sits at byte 128 on every
# architecture (the fields before it have fixed sizes and are naturally aligned); kernels before
# 4.1 return a shorter struct without it.
_TCPI_BYTES_RECEIVED = 128
_TCP_INFO_LEN = _TCPI_BYTES_RECEIVED + 8
_HAVE_TCP_INFO = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_ZMQ_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: enums cost more per get()


def seed_routing_ids() -> None:
    """Seed libc's ``rand()`` with 32 random bits, so the ROUTER's automatic routing ids are secret.

    Call it just before creating the ROUTER socket: libzmq draws the start of the socket's id
    counter from ``rand()`` once, in the socket's constructor, and never seeds ``rand()`` itself.

    What it guarantees: an outsider cannot name the id the next peer without a routing id will
    get, so it cannot claim that id first and make the ROUTER abort; a blind guess hits with a
    chance of about one in 2**32 per id claimed. What it does not: the ids still count up by one
    per connection from the secret start, so anyone who sees one automatic id can predict the
    next ones. The broker must never show a routing id to a peer (in a reply, an error message or
    a status) or anywhere a peer can read it. Under CurveZMQ only a peer whose key is allowed can
    set a routing id at all (it travels after the handshake); with ``--insecure``, anyone can.

    ``rand()`` is process-wide: anything else in the process that calls ``srand()`` with a
    guessable value before the ROUTER is created undoes this. Where libc cannot be loaded (not a
    POSIX system) it logs a warning and does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        srand = libc.srand
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no process-wide handle
        log.warning("cannot seed libc's rand(): this broker's automatic routing ids are predictable; "
                    "require CurveZMQ keys so that only known peers can connect")
        return
    srand.argtypes = [ctypes.c_uint]
    srand.restype = None
    srand(int.from_bytes(os.urandom(4), "big"))


def cut(fd: int) -> None:
    """End the connection on descriptor ``fd`` now, without closing the descriptor.

    A tcp connection is reset (Linux: ``connect()`` to an ``AF_UNSPEC`` address disconnects a
    socket): what the kernel holds for it is dropped and the peer gets a RST at once. A bare
    ``shutdown()`` is not enough against a flood: Linux keeps taking in data after ``SHUT_RD``,
    libzmq goes on reading it (and growing) until the queue runs dry, and the sender, facing a
    full window, learns of the end only when a window probe draws a RST seconds later. Elsewhere,
    and for ipc, ``shutdown(SHUT_RDWR)`` ends it (a unix socket's writer gets EPIPE at once).
    Either way libzmq's next read sees the end, closes its side and reports the disconnect (the
    guard's :meth:`~ConnectionGuard.drain` then returns ``fd``). The descriptor stays libzmq's:
    closing it here would let the number be reused while libzmq still polls it. A descriptor that
    is already gone, or is not a socket, is left alone.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # EBADF: gone; ENOTSOCK: the number now belongs to something else
        return
    try:
        if sock.family in _TCP_FAMILIES:
            _reset(fd)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # ENOTCONN: the connection ended already (or was just reset)
        pass
    finally:
        sock.detach()


def _load_connect() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        connect = ctypes.CDLL(None, use_errno=True).connect
    except (OSError, AttributeError):
        return None
    connect.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    connect.restype = ctypes.c_int
    return connect


_CONNECT = _load_connect()
_UNSPEC = ctypes.create_string_buffer(16)  # a sockaddr whose sa_family is AF_UNSPEC (0)


def _reset(fd: int) -> bool:
    """Disconnect tcp socket ``fd`` (Linux's ``tcp_disconnect``: queues purged, RST sent)."""
    if _CONNECT is None:
        return False
    return bool(_CONNECT(fd, _UNSPEC, len(_UNSPEC)) == 0)


def tcp_bytes_received(fd: int) -> int | None:
    """Bytes the kernel has received on tcp connection ``fd`` (``tcpi_bytes_received``), or None
    where that is not known: not Linux, a kernel before 4.1, not a tcp socket, or gone."""
    if not _HAVE_TCP_INFO:
        return None
    try:
        # Family and type given: the socket object then asks the kernel nothing on creation.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        sock.detach()
    if len(info) < _TCP_INFO_LEN:
        return None
    return int(struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0])


def _inode(fd: int) -> int | None:
    """The inode of socket ``fd``: unique while the socket exists, so a reused number shows."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_ino if stat.S_ISSOCK(info.st_mode) else None


def _is_tcp(fd: int) -> bool:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.family in _TCP_FAMILIES
    finally:
        sock.detach()


@dataclass(slots=True)
class _Connection:
    inode: int
    since: float  # when the monitor's ACCEPTED was read (time.monotonic)
    tcp: bool
    delivered: int = 0  # bytes delivered as whole messages, as of the last check
    spoken: bool = False  # a whole message has come from it
    baseline: int = 0  # received - delivered at the last check that found it clean


class ConnectionGuard:
    """The live connections of one ROUTER socket, and which of them to cut.

    Construct it with the ROUTER before the socket binds (or right after, before any peer
    connects: a connection accepted before the monitor starts is never guarded). The loop:

    * registers :attr:`monitor_socket` in its poller and calls :meth:`drain` when it is readable
      (and once a tick): the descriptors returned have closed, their peers are gone;
    * calls :meth:`note` for every whole message it reads, with the message's descriptor
      (``frame.get(zmq.SRCFD)``) and size (or :meth:`note_many` once for a batch of them);
    * calls :meth:`check` on every pass (it looks at the connections every ``check_interval``
      seconds and otherwise returns at once) and :meth:`cut` for each descriptor it returns.

    A connection is cut when

    (a) *unfinished message* (tcp on Linux): since the last check that found it clean, the kernel
        received more than ``bound`` bytes on it (``max_message_bytes`` + ``slack_bytes``) that
        did not reach the broker as whole messages, and no whole message came from it since the
        previous check. A legitimate message of ``max_message_bytes``, however slowly it comes,
        stays under the bound. Whole messages waiting in ZeroMQ's queue do not count: the loop
        reads in passes (until the socket is dry, or 1000 messages) and looks between them, and
        ZeroMQ serves the connections with a message waiting in turn, so each of them delivers
        one in every pass (up to 1000 such connections). A look that finds messages delivered
        resets the accounting only while what is undelivered stays within the bound, so an
        unfinished message is cut by the time it holds at most ``2 * bound`` plus twice what the
        peer can send in ``check_interval`` (less when it started on a connection that had said
        nothing yet).
    (b) *silent*: it has sent no whole message within ``silent_grace`` seconds of being accepted
        (CurveZMQ handshake included: the monitor's HANDSHAKE_SUCCEEDED carries no descriptor,
        ACCEPTED does), so a connection cannot hold a routing id while saying nothing. Every
        client and worker speaks at once and heartbeats every second.

    Descriptor numbers are reused as soon as libzmq closes one, so the guard knows a connection by
    its number and its socket's inode, and :meth:`cut` acts only on a connection it knows is live.
    ``cut_counts`` counts the cuts by reason (``"silent"``, ``"unfinished"``, ``"asked"``) and
    ``reasons`` says why each descriptor of the last :meth:`check` is to be cut.
    """

    def __init__(self, router: zmq.Socket[Any], max_message_bytes: int, *,
                 silent_grace: float = DEFAULT_SILENT_GRACE, slack_bytes: int = SLACK_BYTES,
                 check_interval: float = DEFAULT_CHECK_INTERVAL) -> None:
        self.bound = max_message_bytes + slack_bytes
        self.silent_grace = silent_grace
        self.check_interval = check_interval
        self._next_check = 0.0
        self._router = router
        self._live: dict[int, _Connection] = {}
        self._closed: list[int] = []  # ended since the last drain()
        self._delivered: defaultdict[int, int] = defaultdict(int)
        self.reasons: dict[int, str] = {}
        self.cut_counts: dict[str, int] = {"silent": 0, "unfinished": 0, "asked": 0}
        # pyzmq's get_monitor_socket() connects with the default high-water mark: a burst of
        # connections could fill the event queue, and an ACCEPTED that never arrives would leave a
        # connection unguarded. This end has none (events are a few bytes, the loop reads them).
        address = f"inproc://runnable-k8s-connections-{id(self):x}"
        router.monitor(address, _EVENTS)
        self.monitor_socket: zmq.Socket[Any] = router.context.socket(zmq.PAIR)
        self.monitor_socket.rcvhwm = 0
        self.monitor_socket.linger = 0
        self.monitor_socket.connect(address)

    @property
    def live(self) -> frozenset[int]:
        """The descriptors of the connections open as of the last :meth:`drain` or :meth:`check`."""
        return frozenset(self._live)

    def note(self, fd: int, nbytes: int) -> None:
        """A whole message of ``nbytes`` (its frames' sizes added up) came from connection ``fd``.

        Called for every message, so it only adds to a counter."""
        self._delivered[fd] += nbytes

    def note_many(self, delivered: dict[int, int]) -> None:
        """What :meth:`note` says, for a batch of messages: ``delivered`` maps each descriptor to
        the bytes its whole messages brought. The loop adds a batch up and calls this once (before
        the next :meth:`check`, which is the only reader)."""
        counts = self._delivered
        for fd, nbytes in delivered.items():
            counts[fd] += nbytes

    def drain(self, pump: bool = True) -> list[int]:
        """Read the monitor's pending events without blocking; return the descriptors whose
        connection ended since the last call (whatever the broker keeps for them is stale).

        ``pump=False`` returns only what :meth:`check` and :meth:`cut` already read from the
        monitor: for a loop whose poller says the monitor socket has nothing waiting (asking the
        socket itself costs more than the rest of a quiet pass)."""
        if pump:
            self._pump()
        closed, self._closed = self._closed, []
        return closed

    def check(self, now: float) -> list[int]:
        """The descriptors to cut now (see the class docstring); ``now`` is ``time.monotonic()``.

        Looks only every ``check_interval`` seconds (an empty list in between), at two system
        calls per live connection (an ``fstat`` and, for tcp, ``TCP_INFO``)."""
        if now < self._next_check:
            return []
        self._next_check = now + self.check_interval
        self._pump()
        self.reasons = {}
        for fd, conn in list(self._live.items()):
            if _inode(fd) != conn.inode:  # closed without an event, and maybe the number reused
                self._forget(fd)
                continue
            delivered = self._delivered.get(fd, 0)
            spoke = delivered != conn.delivered
            conn.delivered = delivered
            if spoke:
                conn.spoken = True
            elif not conn.spoken and now - conn.since >= self.silent_grace:
                self.reasons[fd] = "silent"
            if conn.tcp:
                received = tcp_bytes_received(fd)
                if received is None:
                    conn.tcp = False
                    continue
                undelivered = received - delivered
                if undelivered - conn.baseline <= self.bound:
                    if spoke:
                        conn.baseline = undelivered
                elif not spoke:
                    self.reasons[fd] = "unfinished"
        for fd in [fd for fd in self._delivered if fd not in self._live]:
            del self._delivered[fd]  # a message read after its connection's end was reported
        return list(self.reasons)

    def cut(self, fd: int) -> bool:
        """End connection ``fd`` (see :func:`cut`) if it is live; return whether it was.

        The monitor is read first, so a connection that ended (and whose number another
        connection may have taken) since :meth:`check` is not mistaken for the one judged."""
        self._pump()
        conn = self._live.get(fd)
        if conn is None or _inode(fd) != conn.inode:
            return False
        reason = self.reasons.pop(fd, "asked")
        self.cut_counts[reason] += 1
        log.info("cutting connection %d (%s)", fd, reason)
        cut(fd)
        return True

    def close(self) -> None:
        """Stop the monitor (the ROUTER may already be closed)."""
        try:
            self._router.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor_socket.close(linger=0)

    def _pump(self) -> None:
        # Asks the socket whether an event waits before reading: the broker's loop drains on
        # every pass, and a read that finds nothing raises (costlier than the question).
        monitor = self.monitor_socket
        recv, get = monitor.recv_multipart, monitor.get
        while True:
            try:
                if not int(get(_ZMQ_EVENTS)) & _POLLIN:
                    return
                frames = recv(zmq.NOBLOCK)
            except zmq.ZMQError:  # nothing after all (Again), or the monitor socket was closed
                return
            event = parse_monitor_message(frames)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                inode = _inode(fd)
                if fd in self._live:  # its end was never reported: it is gone all the same
                    self._forget(fd)
                if inode is not None:
                    self._live[fd] = _Connection(inode=inode, since=time.monotonic(), tcp=_is_tcp(fd))
            elif fd in self._live:  # DISCONNECTED or CLOSED
                self._forget(fd)

    def _forget(self, fd: int) -> None:
        del self._live[fd]
        self._delivered.pop(fd, None)
        self._closed.append(fd)
