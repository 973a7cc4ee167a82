"""Protocol messages over ZeroMQ sockets: the one place that sends and receives multipart frames.

Kept apart from ``worker.protocol`` (the message format, which imports nothing heavy) so that the
one-shot ``python -m worker --stdio`` of ephemeral mode, which speaks the protocol as text lines,
never imports pyzmq: it pays for every import on every call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import zmq

# Plain ints: pyzmq's flag enums cost more to combine than a small send itself.
SEND_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
SEND_LAST = int(zmq.NOBLOCK)
COPY_THRESHOLD = 65536  # below this a copy is cheaper than tracking a zero-copy frame


# The send of pyzmq's own socket class, under its Python-level wrapper (which only adds DRAFT
# routing_id / group arguments): one Python call less per frame. Used only for sockets whose send
# is the plain one (a zmq.asyncio socket's send returns a future, and is left to itself).
_PLAIN_SEND = zmq.Socket.send
_BASE_SEND: Callable[..., Any] = zmq.backend.Socket.send


def recv_frames(socket: zmq.Socket[Any], keep_frame: int | None = None) -> list[Any]:
    """One whole message without blocking (raises ``zmq.Again`` when none is waiting): what
    ``recv_multipart(NOBLOCK)`` does, at about half its per-frame cost. The frame at index
    ``keep_frame`` stays a ``zmq.Frame``, for its CURVE ``User-Id`` (the broker reads it).

    Each frame is received as a ``zmq.Frame`` and asked ``frame.more`` (set by libzmq with the
    frame): asking the socket ``get(RCVMORE)`` instead goes through pyzmq's option enum on every
    frame, which cost more than the receive itself."""
    recv = socket.recv  # bound once: a message is read several times a millisecond
    frame = recv(zmq.NOBLOCK, copy=False)
    frames: list[Any] = [frame if keep_frame == 0 else frame.bytes]
    while frame.more:
        frame = recv(copy=False)
        frames.append(frame if len(frames) == keep_frame else frame.bytes)
    return frames


def send_frames(socket: zmq.Socket[Any], frames: list[bytes]) -> None:
    """Send a multipart message without blocking (raises zmq.Again when it cannot go now)."""
    send_routed(socket, None, frames)


def send_routed(socket: zmq.Socket[Any], first: bytes | None, frames: list[bytes]) -> None:
    """Send ``first`` (when given: a ROUTER's routing id) and then ``frames`` as one message,
    without blocking (raises zmq.Again when it cannot go now, and ZMQError(EHOSTUNREACH) from a
    ROUTER with ROUTER_MANDATORY when ``first`` names no peer, before any frame is queued).

    The broker sends every reply so: no list is built to put the routing id in front."""
    if type(socket).send is _PLAIN_SEND:
        base = _BASE_SEND
        if first is not None:
            base(socket, first, SEND_MORE)
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            base(socket, frame, SEND_LAST if i == last else SEND_MORE, len(frame) < COPY_THRESHOLD)
        return
    send = socket.send
    if first is not None:
        send(first, SEND_MORE)
    for frame in frames[:-1]:
        send(frame, SEND_MORE, copy=len(frame) < COPY_THRESHOLD)
    send(frames[-1], SEND_LAST, copy=len(frames[-1]) < COPY_THRESHOLD)


def dealer_socket(context: zmq.Context[Any], keys: Any = None) -> zmq.Socket[Any]:
    """A DEALER set up the way clients and workers both talk to the broker: nothing lingers at
    close, no high-water mark drops a message, CurveZMQ when ``keys`` (a ``PeerKeys``) are given.
    The caller connects it (after attaching a monitor, if it wants one)."""
    sock: zmq.Socket[Any] = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 0
    sock.rcvhwm = 0
    if keys is not None:
        keys.apply(sock)
    return sock


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (tcp on 127.0.0.0/8 or ::1, localhost, ipc,
    inproc): the ones where plaintext is allowed without ``--insecure``."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: assume it is reachable from outside


def plaintext_refusal(address: str, keys: object, insecure: bool, who: str, flag: str) -> str | None:
    """Why ``who`` will not talk plaintext (no ``keys``) to ``address``, and what to do instead; None
    when it may: it has keys, was told ``insecure``, or the address is on this machine. One rule for
    the client's and the worker's side of a connection."""
    if keys is not None or insecure or is_loopback_endpoint(address):
        return None
    return (
        f"refusing to connect {who} to {address} without CurveZMQ keys: that address is not on "
        "this machine, so anyone on the path could read the traffic, and anyone who reaches the "
        "broker could pose as a worker or a client. Make keys with `runnable-k8s keys DIR` and pass "
        f"them (the broker --keys DIR, this side {'--keys DIR' if flag.startswith('--') else 'keys=DIR'}), "
        f"use a 127.0.0.1 or ipc:// address, or pass {flag} if the network is already private."
    )
