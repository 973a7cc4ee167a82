"""A hand-written ZMTP 3.0 peer (NULL mechanism, socket type DEALER) on a plain TCP socket.

libzmq itself cannot send what the hostile tests need: its DEALER keeps an unfinished multipart
message in its own queue until the last frame is sent, so the frames of a message that never
ends never leave the sender. This peer writes frames straight to the wire, the way an attacker
would: ``send_frame(data, more=True)`` for ever.

    peer = RawPeer("127.0.0.1", port, routing_id=b"...")   # greeting and READY sent
    peer.send_message([b"hello"])
    peer.send_frame(b"x" * 65536, more=True)
    peer.closed(timeout=5)                                  # the other side ended the connection?
"""

from __future__ import annotations

import select
import socket
import struct
import time

_GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f"  # signature
             + b"\x03\x00"  # version 3.0
             + b"NULL".ljust(20, b"\x00")  # mechanism
             + b"\x00"  # as-server: no
             + b"\x00" * 31)  # filler

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04


def _frame(flags: int, body: bytes) -> bytes:
    if len(body) > 255:
        return struct.pack("!BQ", flags | _LONG, len(body)) + body
    return struct.pack("!BB", flags, len(body)) + body


def _ready(routing_id: bytes) -> bytes:
    def prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + struct.pack("!I", len(value)) + value

    body = b"\x05READY" + prop(b"Socket-Type", b"DEALER")
    if routing_id:
        body += prop(b"Identity", routing_id)
    return _frame(_COMMAND, body)


class RawPeer:
    """One ZMTP connection to a ROUTER at ``host:port``, routing id ``routing_id`` (none: the
    ROUTER gives it an automatic one)."""

    def __init__(self, host: str, port: int, *, routing_id: bytes = b"", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        # In turn, as libzmq does: greeting, the other's greeting, READY, the other's READY.
        self.sock.sendall(_GREETING)
        self._read_exactly(len(_GREETING))
        self.sock.sendall(_ready(routing_id))
        flags, size = self._read_exactly(2)
        if flags & _LONG:
            size = struct.unpack("!Q", bytes([size]) + self._read_exactly(7))[0]
        self._read_exactly(size)
        self.sent = 0  # bytes of message frames written

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = self.sock.recv(count - len(data))
            if not more:
                raise ConnectionError("the ROUTER closed the connection during the handshake")
            data += more
        return data

    def send_frame(self, data: bytes, *, more: bool, pause_every: int = 0, pause: float = 0.0) -> None:
        """Write one frame; with ``pause_every``, sleep ``pause`` s after each ``pause_every``
        bytes of it (a frame that arrives slowly, as over a slow link)."""
        if not pause_every:
            self.sock.sendall(_frame(_MORE if more else 0, data))
            self.sent += len(data)
            return
        whole = _frame(_MORE if more else 0, data)
        for start in range(0, len(whole), pause_every):
            self.sock.sendall(whole[start:start + pause_every])
            time.sleep(pause)
        self.sent += len(data)

    def send_message(self, frames: list[bytes]) -> None:
        for i, data in enumerate(frames):
            self.send_frame(data, more=i < len(frames) - 1)

    def closed(self, timeout: float) -> bool:
        """Whether the other side ended the connection within ``timeout`` seconds (what it sent
        before that, its greeting and READY, is read and dropped)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        while ready:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:  # ECONNRESET
                return True
            if not data:
                return True
            ready, _, _ = select.select([self.sock], [], [], 0)
        return False

    def close(self) -> None:
        self.sock.close()
