"""What goes into the broker core (its inputs) and what comes out (effects), as plain data.

An "event" in this module is an input of the broker core (a decoded message, or a notice of the
socket loop), not a LangChain callback event (those are relayed by ``worker.callback_events``);
``BrokerInput`` names the union.

The socket loop turns each multipart message into one event with :func:`decode` and carries out
the effects the core returns; the core never sees a socket or a clock. ``decode`` never raises:
a message it cannot read becomes :class:`Malformed`, so "count it and drop it" is a rule of the
core like any other, and a test can feed the core garbage without a socket.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from worker import protocol as P

# ---------------------------------------------------------------------------- who sent it


@dataclass(slots=True)
class FromPeer:
    """What every received message carries besides its content: who sent it.

    ``peer`` is the ROUTER's routing id, only the address replies go to: libzmq gives one per
    connection, but a peer may choose its own, and take over the id of a peer that left. So each
    message also carries the connection it came from (``fd``, the socket's file descriptor) and
    the CurveZMQ key that connection was authenticated with (``key``, Z85; None without keys). The
    core acts on a message only for the state that this same connection and key registered."""

    peer: bytes
    fd: int = field(default=-1, kw_only=True)
    key: bytes | None = field(default=None, kw_only=True)


# ---------------------------------------------------------------------------- events from clients


@dataclass(slots=True)
class Hello(FromPeer):
    environment: dict[str, Any]


@dataclass(slots=True)
class Submit(FromPeer):
    task_id: bytes
    header: bytes  # still JSON: a bad header is answered with the task's id, so the core parses it
    runnable: bytes  # b"" when the client expects the broker to hold it
    input_blob: bytes


@dataclass(slots=True)
class Cancel(FromPeer):
    task_id: bytes


@dataclass(slots=True)
class StatusRequest(FromPeer):
    """A client asking, or a draining worker's fence."""


# ---------------------------------------------------------------------------- events from either


@dataclass(slots=True)
class Heartbeat(FromPeer):
    pass


@dataclass(slots=True)
class Bye(FromPeer):
    pass


# ---------------------------------------------------------------------------- events from workers


@dataclass(slots=True)
class Ready(FromPeer):
    environment: dict[str, Any]


@dataclass(slots=True)
class Chunk(FromPeer):
    task_id: bytes
    chunk: bytes


@dataclass(slots=True)
class CallbackEvent(FromPeer):
    """A callback a worker relays for a task whose client listens (``worker.callback_events``)."""

    task_id: bytes
    data: bytes


@dataclass(slots=True)
class Result(FromPeer):
    task_id: bytes
    output: bytes


@dataclass(slots=True)
class Replies(FromPeer):
    """Several replies of a worker in one message (REPLIES): ``packed`` as received, and
    ``spans``, each entry's ``(kind, task id, start, end)`` in ``packed``. Only the headers were
    read (``P.reply_spans``, strict): the payloads are sliced only for a client that takes classic
    messages, and never decoded."""

    packed: bytes
    spans: list[tuple[bytes, bytes, int, int]]


@dataclass(slots=True)
class WorkerError(FromPeer):
    task_id: bytes  # b"" for a message about the worker itself, not a task
    code: bytes
    body: tuple[bytes, ...]  # forwarded to the client as is


@dataclass(slots=True)
class Draining(FromPeer):
    pass


# ---------------------------------------------------------------------------- bad input


@dataclass(slots=True)
class Malformed(FromPeer):
    reason: str


@dataclass(slots=True)
class ForeignProtocol(FromPeer):
    """A runnable-k8s peer of another protocol version: it deserves a clear answer, not silence."""

    protocol: bytes


# ---------------------------------------------------------------------------- events of the loop


@dataclass(slots=True)
class Tick:
    """A heartbeat interval passed: expire silent peers and overdue queued tasks."""


@dataclass(slots=True)
class SendFailed:
    """The loop could not deliver ``frames`` to ``peer`` (EHOSTUNREACH/EAGAIN): its connection
    is gone. A TASK that never left goes back to the queue."""

    peer: bytes
    frames: list[bytes]


@dataclass(slots=True)
class PeerStalled:
    """``peer`` has not read its replies: ``unread_bytes`` wait for it past the outbox's budget,
    or nothing moved for too long. A client is dropped (its tasks cancelled); a worker is
    treated as gone."""

    peer: bytes
    unread_bytes: int


@dataclass(slots=True)
class ConnectionClosed:
    """The connection with file descriptor ``fd`` closed (the socket monitor saw it go): whatever
    registered on it is gone now, not at its next missed heartbeat.

    ``seen``: how many messages the core had handled when the loop learned of the close. The
    number is reused at once, and a new connection on it may register before this event is
    handled (the loop first reads what the old one sent before it left); what registered after
    ``seen`` is not the closed connection's. None: everything registered on ``fd``."""

    fd: int
    seen: int | None = None


@dataclass(slots=True)
class KeysChanged:
    """The allow-lists were re-read: the Z85 public keys that may now be clients and workers.
    Peers whose key was taken out are dropped and their connections cut."""

    client_keys: frozenset[bytes]
    worker_keys: frozenset[bytes]


Event = (Hello | Submit | Cancel | StatusRequest | Heartbeat | Bye | Ready | Chunk | CallbackEvent | Result
         | Replies | WorkerError | Draining | Tick | SendFailed | PeerStalled | ConnectionClosed | KeysChanged
         | Malformed | ForeignProtocol)
BrokerInput = Event  # the clearer name for new code: what BrokerCore.handle takes

# ---------------------------------------------------------------------------- effects


class Send(NamedTuple):
    """Send ``frames`` to ``peer`` (the ROUTER adds nothing: frames start with the protocol)."""

    peer: bytes
    frames: list[bytes]


class Latency(NamedTuple):
    """A task's result was forwarded ``seconds`` after its SUBMIT (for the latency histogram)."""

    seconds: float


class Forget(NamedTuple):
    """``peer`` left (BYE, or it stopped heartbeating): drop whatever still waits to be sent to it."""

    peer: bytes


class Disconnect(NamedTuple):
    """Close the connection with file descriptor ``fd`` now (its key was revoked, or it is no
    longer allowed at all): CurveZMQ checks a key only at the handshake, so an open connection
    would otherwise keep talking."""

    fd: int


class WakeObservers(NamedTuple):
    """Run the status hooks now: a task arrived at a pool with no workers, and an autoscaler at
    zero should not wait for the next tick to start one."""


Effect = Send | Latency | Forget | Disconnect | WakeObservers

# ---------------------------------------------------------------------------- decoding

# Another version of this protocol: echoed back in the refusal, so it is kept short and plain.
_FOREIGN_PROTOCOL = re.compile(rb"RK8S/[0-9]{1,6}")


def _environment(name: str, body: list[bytes]) -> dict[str, Any]:
    """A HELLO's or READY's JSON body, refused unparsed past ``P.MAX_HELLO_BYTES``: parsing a
    hostile 8 MB body cost the broker about 35 MB and a third of a second for each message.
    The values that name an environment (tasks queue by them) must be plain: a list there would
    make the rules fail on a value they cannot hash."""
    if not body:
        return {}
    if len(body[0]) > P.MAX_HELLO_BYTES:
        raise ValueError(f"{name} body of {len(body[0])} bytes, over the limit of {P.MAX_HELLO_BYTES}")
    environment = P.decode_json_object(body[0])
    for key in P.COMPATIBILITY_KEYS:
        if not isinstance(environment.get(key), (str, int, float, bool, type(None))):
            raise ValueError(f"{name} gives {key} as a {type(environment[key]).__name__}, not a plain value")
    return environment


def ready_numbers(environment: dict[str, Any]) -> tuple[int, int]:
    """The slots and the runnable cache size a READY claims (at least 1 each); ValueError when
    either is not a number. The decoder checks it, so such a READY arrives as :class:`Malformed`;
    the core asks again for a READY built by hand."""
    numbers = []
    for name, default in (("concurrency", 1), ("cache_size", 64)):
        value = environment.get(name, default)
        try:
            numbers.append(max(1, int(value)))
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"READY gives {name} as {str(value)[:40]!r}, not a whole number") from None
    return numbers[0], numbers[1]


def _ready(peer: bytes, body: list[bytes], fd: int, key: bytes | None) -> Ready:
    environment = _environment("READY", body)
    ready_numbers(environment)
    return Ready(peer, environment, fd=fd, key=key)


def _submit(peer: bytes, body: list[bytes], fd: int, key: bytes | None) -> Submit:
    if len(body) != 4:
        raise ValueError(f"SUBMIT has {len(body)} body frames, expected 4")
    return Submit(peer, body[0], body[1], body[2], body[3], fd=fd, key=key)


def _error(peer: bytes, body: list[bytes], fd: int, key: bytes | None) -> WorkerError:
    task_id = body[0] if body else b""
    if task_id and len(body) < 2:
        raise ValueError("ERROR about a task has no code")
    return WorkerError(peer, task_id, body[1] if len(body) > 1 else b"", tuple(body), fd=fd, key=key)


def _replies(peer: bytes, body: list[bytes], fd: int, key: bytes | None) -> Replies:
    if len(body) != 1:
        raise ValueError(f"REPLIES has {len(body)} body frames, expected 1")
    return Replies(peer, body[0], P.reply_spans(body[0]), fd=fd, key=key)


_Decoder = Callable[[bytes, list[bytes], int, "bytes | None"], Event]

_DECODERS: dict[bytes, _Decoder] = {
    P.HELLO: lambda peer, body, fd, key: Hello(peer, _environment("HELLO", body), fd=fd, key=key),
    P.SUBMIT: _submit,
    P.CANCEL: lambda peer, body, fd, key: Cancel(peer, body[0] if body else b"", fd=fd, key=key),
    P.STATUS: lambda peer, body, fd, key: StatusRequest(peer, fd=fd, key=key),
    P.HEARTBEAT: lambda peer, body, fd, key: Heartbeat(peer, fd=fd, key=key),
    P.BYE: lambda peer, body, fd, key: Bye(peer, fd=fd, key=key),
    P.READY: _ready,
    P.CHUNK: lambda peer, body, fd, key: Chunk(peer, body[0], body[1], fd=fd, key=key),
    P.EVENT: lambda peer, body, fd, key: CallbackEvent(peer, body[0], body[1], fd=fd, key=key),
    P.RESULT: lambda peer, body, fd, key: Result(peer, body[0], body[1], fd=fd, key=key),
    P.REPLIES: _replies,
    P.ERROR: _error,
    P.DRAINING: lambda peer, body, fd, key: Draining(peer, fd=fd, key=key),
}


def decode(frames: list[bytes], fd: int = -1, key: bytes | None = None) -> Event:
    """One received message, ``[identity, protocol, command, *body]``, as an event from the
    connection ``fd`` authenticated with ``key``."""
    peer = frames[0]
    if len(frames) < 3:
        return Malformed(peer, f"a message of {len(frames)} frames (too short)", fd=fd, key=key)
    if len(frames) > P.MAX_FRAMES + 1:  # + the identity the ROUTER put first
        return Malformed(peer, f"a message of {len(frames) - 1} frames (no command has more than {P.MAX_FRAMES})",
                         fd=fd, key=key)
    protocol, command, body = frames[1], frames[2], frames[3:]
    if protocol != P.PROTOCOL:
        if _FOREIGN_PROTOCOL.fullmatch(protocol):
            return ForeignProtocol(peer, protocol, fd=fd, key=key)
        return Malformed(peer, "a message that is not runnable-k8s protocol", fd=fd, key=key)
    decoder = _DECODERS.get(command)
    if decoder is None:
        return Malformed(peer, f"unknown command {command[:16]!r}", fd=fd, key=key)
    try:
        return decoder(peer, body, fd, key)
    except Exception as exc:  # noqa: BLE001 - bad JSON, missing frames, deep nesting: all malformed
        return Malformed(peer, f"a bad {P.COMMAND_NAMES[command]}: {exc!r}"[:300], fd=fd, key=key)
