"""What goes into the broker core (events) and what comes out (effects), as plain data.

The socket loop turns each multipart message into one event with :func:`decode` and carries out
the effects the core returns; the core never sees a socket or a clock. ``decode`` never raises:
a message it cannot read becomes :class:`Malformed`, so "count it and drop it" is a rule of the
core like any other, and a test can feed the core garbage without a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from worker import protocol as P

# ---------------------------------------------------------------------------- events from clients


@dataclass(slots=True)
class Hello:
    peer: bytes
    environment: dict[str, Any]
    user_id: str | None = None  # the CURVE public key (Z85) it connected with, when keys are on


@dataclass(slots=True)
class Submit:
    peer: bytes
    task_id: bytes
    header: bytes  # still JSON: a bad header is answered with the task's id, so the core parses it
    runnable: bytes  # b"" when the client expects the broker to hold it
    input_blob: bytes


@dataclass(slots=True)
class Cancel:
    peer: bytes
    task_id: bytes


@dataclass(slots=True)
class StatusRequest:
    peer: bytes  # a client asking, or a draining worker's fence


# ---------------------------------------------------------------------------- events from either


@dataclass(slots=True)
class Heartbeat:
    peer: bytes


@dataclass(slots=True)
class Bye:
    peer: bytes


# ---------------------------------------------------------------------------- events from workers


@dataclass(slots=True)
class Ready:
    peer: bytes
    environment: dict[str, Any]
    user_id: str | None = None  # the CURVE public key (Z85) it connected with, when keys are on


@dataclass(slots=True)
class Chunk:
    peer: bytes
    task_id: bytes
    chunk: bytes


@dataclass(slots=True)
class CallbackEvent:
    """A callback a worker relays for a task whose client listens (``worker.callback_events``)."""

    peer: bytes
    task_id: bytes
    data: bytes


@dataclass(slots=True)
class Result:
    peer: bytes
    task_id: bytes
    output: bytes


@dataclass(slots=True)
class WorkerError:
    peer: bytes
    task_id: bytes  # b"" for a message about the worker itself, not a task
    code: bytes
    body: tuple[bytes, ...]  # forwarded to the client as is


@dataclass(slots=True)
class Draining:
    peer: bytes


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
class KeysChanged:
    """The allow-lists were re-read: the Z85 public keys that may now be clients and workers.
    Peers whose key was taken out are dropped."""

    client_keys: frozenset[bytes]
    worker_keys: frozenset[bytes]


@dataclass(slots=True)
class Malformed:
    peer: bytes
    reason: str


@dataclass(slots=True)
class ForeignProtocol:
    """A runnable-k8s peer of another protocol version: it deserves a clear answer, not silence."""

    peer: bytes
    protocol: bytes


Event = (Hello | Submit | Cancel | StatusRequest | Heartbeat | Bye | Ready | Chunk | CallbackEvent | Result
         | WorkerError | Draining | Tick | SendFailed | PeerStalled | KeysChanged | Malformed | ForeignProtocol)

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


class WakeObservers(NamedTuple):
    """Run the status hooks now: a task arrived at a pool with no workers, and an autoscaler at
    zero should not wait for the next tick to start one."""


Effect = Send | Latency | Forget | WakeObservers

# ---------------------------------------------------------------------------- decoding


def _json_or_empty(body: list[bytes]) -> dict[str, Any]:
    return P.decode_json_object(body[0]) if body else {}


def _submit(peer: bytes, body: list[bytes], user_id: str | None) -> Submit:
    if len(body) != 4:
        raise ValueError(f"SUBMIT has {len(body)} body frames, expected 4")
    return Submit(peer, body[0], body[1], body[2], body[3])


def _error(peer: bytes, body: list[bytes], user_id: str | None) -> WorkerError:
    task_id = body[0] if body else b""
    if task_id and len(body) < 2:
        raise ValueError("ERROR about a task has no code")
    return WorkerError(peer, task_id, body[1] if len(body) > 1 else b"", tuple(body))


_Decoder = Callable[[bytes, list[bytes], "str | None"], Event]

_DECODERS: dict[bytes, _Decoder] = {
    P.HELLO: lambda peer, body, user: Hello(peer, _json_or_empty(body), user),
    P.SUBMIT: _submit,
    P.CANCEL: lambda peer, body, user: Cancel(peer, body[0] if body else b""),
    P.STATUS: lambda peer, body, user: StatusRequest(peer),
    P.HEARTBEAT: lambda peer, body, user: Heartbeat(peer),
    P.BYE: lambda peer, body, user: Bye(peer),
    P.READY: lambda peer, body, user: Ready(peer, _json_or_empty(body), user),
    P.CHUNK: lambda peer, body, user: Chunk(peer, body[0], body[1]),
    P.EVENT: lambda peer, body, user: CallbackEvent(peer, body[0], body[1]),
    P.RESULT: lambda peer, body, user: Result(peer, body[0], body[1]),
    P.ERROR: _error,
    P.DRAINING: lambda peer, body, user: Draining(peer),
}


def decode(frames: list[bytes], user_id: str | None = None) -> Event:
    """One received message, ``[identity, protocol, command, *body]``, as an event."""
    peer = frames[0]
    if len(frames) < 3:
        return Malformed(peer, f"a message of {len(frames)} frames (too short)")
    if len(frames) > P.MAX_FRAMES + 1:  # + the identity the ROUTER put first
        return Malformed(peer, f"a message of {len(frames) - 1} frames (no command has more than {P.MAX_FRAMES})")
    protocol, command, body = frames[1], frames[2], frames[3:]
    if protocol != P.PROTOCOL:
        if protocol.startswith(P.PROTOCOL_FAMILY):
            return ForeignProtocol(peer, protocol)
        return Malformed(peer, "a message that is not runnable-k8s protocol")
    decoder = _DECODERS.get(command)
    if decoder is None:
        return Malformed(peer, f"unknown command {command[:16]!r}")
    try:
        return decoder(peer, body, user_id)
    except Exception as exc:  # noqa: BLE001 - bad JSON, missing frames, deep nesting: all malformed
        return Malformed(peer, f"a bad {P.COMMAND_NAMES[command]}: {exc!r}"[:300])
