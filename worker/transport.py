"""Protocol messages over ZeroMQ sockets: the one place that sends and receives multipart frames.

Kept apart from ``worker.protocol`` (the message format, which imports nothing heavy) so that the
one-shot ``python -m worker --stdio`` of ephemeral mode, which speaks the protocol as text lines,
never imports pyzmq: it pays for every import on every call.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import zmq

# Plain ints: pyzmq's flag enums cost more to combine than a small send itself.
SEND_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
SEND_LAST = int(zmq.NOBLOCK)
COPY_THRESHOLD = 65536  # below this a copy is cheaper than tracking a zero-copy frame


_RCVMORE = int(zmq.RCVMORE)  # a plain int: pyzmq's enum costs more on every get()


def recv_frames(socket: zmq.Socket[Any], keep_frame: int | None = None) -> list[Any]:
    """One whole message without blocking (raises ``zmq.Again`` when none is waiting): what
    ``recv_multipart(NOBLOCK)`` does, at a third of its per-frame cost. The frame at index
    ``keep_frame`` stays a ``zmq.Frame``, for its CURVE ``User-Id`` (the broker reads it)."""
    recv, get = socket.recv, socket.get  # bound once: a message is read several times a millisecond
    if keep_frame == 0:
        frames: list[Any] = [recv(zmq.NOBLOCK, copy=False)]
    else:
        frames = [recv(zmq.NOBLOCK)]
    while get(_RCVMORE):
        frames.append(recv(copy=False) if len(frames) == keep_frame else recv())
    return frames


def send_frames(socket: zmq.Socket[Any], frames: list[bytes]) -> None:
    """Send a multipart message without blocking (raises zmq.Again when it cannot go now)."""
    send = socket.send
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
