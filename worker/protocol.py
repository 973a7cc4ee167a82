"""The runnable-k8s wire protocol, defined in exactly one place.

Clients and workers both talk to the broker over one ZeroMQ ROUTER socket (one port, so a single
``kubectl port-forward`` reaches everything). Every message a peer sends is a multipart message::

    [PROTOCOL, COMMAND, *body]

(the broker's ROUTER prepends the peer's identity frame on receipt and strips it on send).
``PROTOCOL`` carries the protocol version, so a peer from another release is recognised and
refused with a clear ``incompatible`` error instead of being misread.

The model is the zguide's Majordomo protocol (7/MDP) with the PARTIAL/FINAL replies of 18/MDP
(here CHUNK/RESULT) and Paranoid Pirate heartbeating, reduced to what a task pool needs.

Client -> broker
    HELLO      [json environment]                      -> WELCOME [json broker info] or ERROR
    SUBMIT     [task id, json header, runnable, input]  runnable may be b"" when sent before
    CANCEL     [task id]
    STATUS     []                                       -> STATUS  [json counters]
    HEARTBEAT  []                                       -> HEARTBEAT
    BYE        []

Worker -> broker
    READY      [json environment]                      -> WELCOME or ERROR (then the worker exits)
    CHUNK      [task id, encoded chunk]                 forwarded to the client as is
    EVENT      [task id, encoded callback event]        forwarded as is (only for a header with
                                                        ``events``: worker.callback_events)
    RESULT     [task id, encoded output]                forwarded; frees the slot
    REPLIES    [packed]                                 several CHUNK/EVENT/RESULT replies in one
                                                        message (only after a WELCOME saying
                                                        ``"replies": true``; see below)
    ERROR      [task id, code, message, detail]         forwarded (unless the broker handles code)
    DRAINING   []                                       stop sending me tasks (SIGTERM)
    STATUS     []                                       -> STATUS: sent after DRAINING as a fence
                                                        (answers come in order: once it is back,
                                                        every task sent before DRAINING is here)
    HEARTBEAT  []
    BYE        []

Broker -> client
    WELCOME, STATUS, HEARTBEAT, RECONNECT, ERROR and the replies above: CHUNK, EVENT, RESULT, or
    REPLIES [packed] to a client whose HELLO said ``"replies": true``

Broker -> worker
    TASK       [task id, json header, runnable, input]  runnable is b"" if the worker holds it
    CANCEL     [task id]
    HEARTBEAT  []
    RECONNECT  []                                       "I do not know you": send READY again

Replies travel together. A streamed token is a few bytes, and each message costs every hop it
crosses a fixed ~10-15 us of frame handling, far more than the token itself. So the replies a
worker has ready at one moment go out as one REPLIES message whose ``packed`` frame is a run of
entries, each ``kind`` (1 byte: the CHUNK, EVENT or RESULT command byte), task id (16 bytes),
payload length (4 bytes, big-endian) and the payload: exactly the frames the classic message
would carry (:func:`pack_replies`, :func:`unpack_replies`). Nothing waits to be packed: what is
queued when the worker's I/O thread wakes goes together, and a lone reply goes alone. The broker
reads entry headers only and forwards each client's entries as one REPLIES (the received frame as
is when all of it goes to one client), or as classic messages to a client that did not ask for
them. Both sides announce it (``"replies": true`` in WELCOME, in the client's HELLO), so a peer of
an older release of this same protocol version keeps getting and sending classic messages. A
REPLIES that is not exactly a run of well-formed entries (at least one, known kinds, lengths that
end exactly at the frame's end) is malformed and dropped whole.

Over stdin/stdout (ephemeral mode: ``python -m worker --stdio``, one task per process or Pod) the
same messages travel as text lines, ``RK8S/2 COMMAND base64 base64 ...``, so that they survive any
byte stream (the Kubernetes attach API included); lines without that prefix are not ours and are
skipped. The worker writes nothing until it has read the client's HELLO, so nothing is lost
before the reader has attached::

    client: HELLO [json environment]        worker: READY [json environment] (or ERROR incompatible)
    client: TASK  [json header, runnable, input]
                                            worker: CHUNK [chunk] ... then RESULT [output] or ERROR
                                            (EVENT [event] lines among them when asked for)

A task id is 16 random bytes chosen by the client. The JSON header of SUBMIT/TASK is
:class:`TaskHeader`. A task is an ``invoke`` (RESULT carries the output), a ``stream`` (CHUNKs,
then an empty RESULT) or a ``batch`` of ``items`` inputs: its input blob is
``codec.dumps((values, kwargs))``, every item's outcome comes back as one CHUNK as soon as it is
known, in completion order, packed with :func:`pack_item` / :func:`pack_item_error` (the item's
index and either its encoded output or its error code, message and detail), and an empty RESULT
ends the task. An ERROR (worker lost, timeout, cancel) ends it early: the items not reported by
then have that error, those reported keep theirs.

A header with ``events`` true asks the worker to relay the callbacks the runnable raises
(``worker.callback_events``): each is an EVENT, in order with the task's CHUNKs, before its
RESULT. The client asks only when a handler listens on its side (``pool.client.callback_relay``);
``tokens`` says one of them streams tokens (as ``astream_events`` does), so that a chat model
invoked on the worker streams there as it would on the client.

Runnables are identified by the digest of their encoded bytes, so a repeated call sends only the
digest and the worker reuses the runnable it already deserialized.
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 2
PROTOCOL = b"RK8S/%d" % PROTOCOL_VERSION
PROTOCOL_FAMILY = b"RK8S/"

# Commands: one byte each.
HELLO = b"H"
WELCOME = b"W"
SUBMIT = b"S"
TASK = b"T"
CHUNK = b"C"
EVENT = b"V"
RESULT = b"R"
ERROR = b"E"
CANCEL = b"X"
STATUS = b"?"
READY = b"Y"
DRAINING = b"D"
HEARTBEAT = b"."
RECONNECT = b"!"
BYE = b"B"
REPLIES = b"P"

COMMAND_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", SUBMIT: "SUBMIT", TASK: "TASK", CHUNK: "CHUNK", EVENT: "EVENT",
    RESULT: "RESULT", ERROR: "ERROR", CANCEL: "CANCEL", STATUS: "STATUS", READY: "READY",
    DRAINING: "DRAINING", HEARTBEAT: "HEARTBEAT", RECONNECT: "RECONNECT", BYE: "BYE",
    REPLIES: "REPLIES",
}

TASK_ID_BYTES = 16
# No message of this protocol has more frames than a SUBMIT or an ERROR (protocol, command and
# four body frames); the broker counts anything longer as malformed and drops it.
MAX_FRAMES = 6

# Heartbeating (Paranoid Pirate): every peer sends something at least every interval; a peer
# silent for LIVENESS intervals is dead. 3 misses at 1 s notices a dead worker in ~3 s without
# flagging one that is merely slow to be scheduled on a busy 2-core machine.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3
HEARTBEAT_EXPIRY = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS

# Error codes carried by ERROR. The client maps each to one exception class (pool.errors).
E_REMOTE = b"remote"  # the runnable raised; detail is the encoded exception
E_WORKER_LOST = b"worker-lost"
E_TIMEOUT = b"timeout"  # the call's deadline passed on the worker
E_QUEUE_TIMEOUT = b"queue-timeout"  # no worker slot freed up in time
E_QUEUE_FULL = b"queue-full"
E_INCOMPATIBLE = b"incompatible"
E_PAYLOAD_TOO_LARGE = b"payload-too-large"
E_SERIALIZATION = b"serialization"
E_BAD_REQUEST = b"bad-request"
E_UNAUTHORIZED = b"unauthorized"
# Made up by the client itself when it loses the broker; never sent.
E_POOL_UNAVAILABLE = b"pool-unavailable"
# Internal codes, handled by the peer that receives them and never surfaced to users.
E_NEED_RUNNABLE = b"need-runnable"  # "send this task again with the runnable's bytes"
E_REQUEUE = b"requeue"  # worker is draining: give this task to another worker
E_HELLO_REQUIRED = b"hello-required"  # broker does not know this client (it restarted)
E_CANCELLED = b"cancelled"  # worker's answer to CANCEL: the client stopped waiting for it
# "This client key's allowance (tasks or bytes held in the broker) is full right now": the task was
# not taken, and the client sends it again once one of its own tasks has finished (backpressure,
# not a failure). A task that could never fit is refused with E_QUEUE_FULL instead.
E_BUSY = b"busy"
# "The worker that held this task's thread (its ``affinity``) is gone, and with it the thread's
# checkpoint, which lived in that worker's memory": surfaced to the user as ``pool.errors.ThreadLost``.
E_THREAD_LOST = b"thread-lost"
# "Not hedged": the broker's answer to a hedge (a task with ``hedge_of``) it will not run, because
# the original is not running yet, has already produced output, or no other worker has a free
# slot. Internal: the client keeps waiting for the original.
E_NO_HEDGE = b"no-hedge"

# A HELLO's or READY's body (a small JSON environment) is at most this many bytes; a longer one is
# malformed and is never parsed.
MAX_HELLO_BYTES = 4096


# An affinity key (the value of a configurable key such as LangGraph's ``thread_id``) is at most this
# many characters; a task id named by ``hedge_of`` is 16 bytes, in hex.
MAX_AFFINITY_CHARS = 256
HEDGE_OF_CHARS = 32

# Task kinds; a batch carries ``items`` inputs (at most MAX_ITEMS: the index of an item is a
# 32-bit number on the wire, and this bound keeps a hostile header's claim small).
KINDS = ("invoke", "stream", "batch")
MAX_ITEMS = 65536


@dataclass
class TaskHeader:
    """The JSON header of SUBMIT and TASK.

    ``timeout`` is relative (seconds left when sent) so that no two machines' clocks need agree.
    ``config`` holds only the JSON-safe part of a RunnableConfig (see docs/design.md#the-warm-path).
    ``trust`` is the client's ``trust_workers``: only then may the worker send outputs, chunks and
    exceptions pickled (any object); otherwise it sends them as data (``codec.dumps_result``).
    """

    kind: str  # "invoke", "stream" or "batch"
    digest: str
    timeout: float | None = None
    retries: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    trust: bool = False
    items: int = 1  # inputs in a "batch" task; 1 for the others (and then left out of the JSON)
    events: bool = False  # relay callback events (EVENT messages); left out of the JSON when false
    tokens: bool = False  # and the caller streams tokens (astream_events, LangGraph "messages"): models stream
    # The task's thread (the value of the configurable key its RunnableK8s names, LangGraph's
    # ``thread_id`` by default): the broker sends every task of one thread and runnable to the
    # worker that ran its first, while that worker lives. None (left out of the JSON): any worker.
    affinity: str | None = None
    # The hex id of this client's task that this one duplicates (a hedge): the broker runs it only
    # on another worker with a free slot, or answers E_NO_HEDGE. None (left out): not a hedge.
    hedge_of: str | None = None

    def to_bytes(self) -> bytes:
        # Built by hand: dataclasses.asdict deep-copies, and this runs once per task.
        raw = {"kind": self.kind, "digest": self.digest, "timeout": self.timeout, "retries": self.retries,
               "config": self.config, "trust": self.trust}
        if self.items != 1:
            raw["items"] = self.items
        if self.events:
            raw["events"] = True
        if self.tokens:
            raw["tokens"] = True
        if self.affinity is not None:
            raw["affinity"] = self.affinity
        if self.hedge_of is not None:
            raw["hedge_of"] = self.hedge_of
        return json.dumps(raw, separators=(",", ":")).encode()

    # Headers already parsed, by their exact bytes: a caller repeating a call sends the same header
    # bytes every time, and the broker and the worker then parse and check its JSON once, not once
    # per task. Only headers that passed every check are kept, keyed by their whole bytes, so a
    # peer's bytes can only ever yield the header those bytes say; it is bounded in entries and in
    # the size of a header kept, and emptied when full (a flood of distinct headers only costs a
    # parse each, as without it). Not annotated as a field: it is the class's, not a header's.
    _parsed = dict[bytes, tuple[Any, ...]]()  # noqa: RUF012 (ClassVar would need an import here)
    _PARSED_MAX_ENTRIES = 512
    _PARSED_MAX_BYTES = 4096

    @classmethod
    def from_bytes(cls, data: bytes, *, own_config: bool = True) -> TaskHeader:
        """The header ``data`` encodes, checked (ValueError saying what is wrong otherwise).

        Every call returns a new object: callers change a header they parsed (the client lowers
        ``timeout`` and ``retries`` before sending a task again). Its ``config`` is its own too,
        unless ``own_config=False``: then it may be the cache's, for a reader that never changes
        it (the broker only reads a header; copying a config costs as much as parsing it)."""
        hit = cls._parsed.get(data)
        if hit is None:
            header = cls._parse(data)
            if len(data) <= cls._PARSED_MAX_BYTES:
                if len(cls._parsed) >= cls._PARSED_MAX_ENTRIES:
                    cls._parsed.clear()
                cls._parsed[bytes(data)] = (header.kind, header.digest, header.timeout, header.retries,
                                            cls._copy_json(header.config) if own_config else header.config,
                                            header.trust, header.items, header.events, header.tokens,
                                            header.affinity, header.hedge_of)
            return header
        kind, digest, timeout, retries, config, trust, items, events, tokens, affinity, hedge_of = hit
        if own_config:
            config = cls._copy_json(config) if config else {}
        return cls(kind, digest, timeout, retries, config, trust, items, events, tokens, affinity, hedge_of)

    @staticmethod
    def _copy_json(value: Any) -> Any:
        """A deep copy of a JSON value (dicts, lists and scalars), quicker than ``copy.deepcopy``."""
        if isinstance(value, dict):
            return {key: TaskHeader._copy_json(item) for key, item in value.items()}
        if isinstance(value, list):
            return [TaskHeader._copy_json(item) for item in value]
        return value

    @classmethod
    def _parse(cls, data: bytes) -> TaskHeader:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
            raise ValueError("task header must be an object with kind 'invoke', 'stream' or 'batch'")
        if not isinstance(raw.get("digest"), str):
            raise ValueError("task header needs a string digest")
        timeout = raw.get("timeout")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise ValueError("task header timeout must be a number or null")
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise ValueError("task header config must be an object")
        trust = raw.get("trust", False)
        if not isinstance(trust, bool):
            raise ValueError("task header trust must be true or false")
        items = raw.get("items", 1)
        if not isinstance(items, int) or isinstance(items, bool) or not 1 <= items <= MAX_ITEMS:
            raise ValueError(f"task header items must be a whole number from 1 to {MAX_ITEMS}")
        if items != 1 and raw["kind"] != "batch":
            raise ValueError("only a batch task has more than one item")
        events, tokens = raw.get("events", False), raw.get("tokens", False)
        if not isinstance(events, bool) or not isinstance(tokens, bool):
            raise ValueError("task header events and tokens must be true or false")
        affinity = raw.get("affinity")
        if affinity is not None and (not isinstance(affinity, str) or not 0 < len(affinity) <= MAX_AFFINITY_CHARS):
            raise ValueError(f"task header affinity must be a string of 1 to {MAX_AFFINITY_CHARS} characters")
        hedge_of = raw.get("hedge_of")
        if hedge_of is not None and not _is_task_hex(hedge_of):
            raise ValueError(f"task header hedge_of must be a task id: {HEDGE_OF_CHARS} lowercase hex digits")
        return cls(
            kind=raw["kind"],
            digest=raw["digest"],
            timeout=timeout,
            retries=int(raw.get("retries") or 0),
            config=config,
            trust=trust,
            items=items,
            events=events,
            tokens=tokens,
            affinity=affinity,
            hedge_of=hedge_of,
        )


def _is_task_hex(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == HEDGE_OF_CHARS
            and all(c in "0123456789abcdef" for c in value))


# One item of a batch task, the data frame of its CHUNK: index (u32), length of the error code
# (u8, 0 for an output), length of the error message (u32), then the code, the message and the
# payload (the encoded output, or the error's detail) to the end of the frame.
_ITEM = struct.Struct(">IBI")
_MAX_CODE_BYTES = 64


def pack_item(index: int, encoded_output: bytes) -> bytes:
    """A batch item that produced an output (``codec.dumps_output`` bytes)."""
    return _ITEM.pack(index, 0, 0) + encoded_output


def pack_item_error(index: int, code: bytes, message: str, detail: bytes = b"") -> bytes:
    """A batch item that failed: the same ``(code, message, detail)`` as a task's ERROR."""
    encoded = message.encode("utf-8", "replace")
    if not code or len(code) > _MAX_CODE_BYTES:
        raise ValueError("an item's error code must be 1 to 64 bytes")
    return _ITEM.pack(index, len(code), len(encoded)) + code + encoded + detail


def item_failed(data: bytes | memoryview, items: int) -> bool:
    """Whether a packed item is an error (True) or an output (False), reading its header only (the
    broker counts items with it, without copying the payload). Raises ValueError as unpack_item."""
    if len(data) < _ITEM.size:
        raise ValueError(f"a batch item needs at least {_ITEM.size} bytes, got {len(data)}")
    index, code_length, message_length = _ITEM.unpack_from(data)
    if index >= items or code_length > _MAX_CODE_BYTES or _ITEM.size + code_length + message_length > len(data):
        raise ValueError("malformed batch item")
    return bool(code_length > 0)


def unpack_item(data: bytes, items: int | None = None) -> tuple[int, bytes | None, str, bytes]:
    """``(index, code or None, message, payload)`` of a packed item; ``code`` is None for an
    output (then ``payload`` is the encoded output), else ``payload`` is the error's detail.
    Raises ValueError for anything malformed, and for an index not below ``items`` when given."""
    if len(data) < _ITEM.size:
        raise ValueError(f"a batch item needs at least {_ITEM.size} bytes, got {len(data)}")
    index, code_length, message_length = _ITEM.unpack_from(data)
    if items is not None and index >= items:
        raise ValueError(f"batch item index {index} is out of range for {items} items")
    start = _ITEM.size
    if code_length == 0:
        if message_length:
            raise ValueError("a batch item with an output carries no message")
        return index, None, "", bytes(data[start:])
    if code_length > _MAX_CODE_BYTES or start + code_length + message_length > len(data):
        raise ValueError("a batch item's error code or message runs past its end")
    code = bytes(data[start:start + code_length])
    message = bytes(data[start + code_length:start + code_length + message_length]).decode("utf-8", "replace")
    return index, code, message, bytes(data[start + code_length + message_length:])


# REPLIES: entries of kind (1 byte), task id (16 bytes), payload length (u32), then the payload.
_ENTRY = struct.Struct(">c16sI")
REPLY_ENTRY_HEADER_BYTES = _ENTRY.size
REPLY_KINDS = frozenset({CHUNK, EVENT, RESULT})
# A worker packs at most this many bytes into one REPLIES (and less than the broker's message
# limit), and sends a payload of PACK_ALONE_BYTES or more as a classic message on its own: copying
# a large payload into a pack would cost more than the message it saves.
MAX_PACK_BYTES = 256 * 1024
PACK_ALONE_BYTES = 64 * 1024


def reply_entry(kind: bytes, task_id: bytes, payload: bytes) -> bytes:
    """The header of one REPLIES entry (the payload follows it): see :func:`pack_replies`."""
    return _ENTRY.pack(kind, task_id, len(payload))


def pack_replies(entries: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """The ``packed`` frame of a REPLIES message: ``(kind, task id, payload)`` entries, in order,
    where kind is CHUNK, EVENT or RESULT. Raises ValueError for anything :func:`unpack_replies`
    would refuse, so that a bug shows here and not as a message the peer drops."""
    if not entries:
        raise ValueError("a REPLIES message carries at least one reply")
    parts: list[bytes] = []
    for kind, task_id, payload in entries:
        if kind not in REPLY_KINDS or len(task_id) != TASK_ID_BYTES:
            raise ValueError(f"cannot pack a {COMMAND_NAMES.get(kind, kind)!r} reply with a task id of "
                             f"{len(task_id)} bytes")
        parts.append(_ENTRY.pack(kind, task_id, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def reply_spans(packed: bytes) -> list[tuple[bytes, bytes, int, int]]:
    """``(kind, task id, start, end)`` of every entry of a REPLIES frame, reading headers only
    (the broker never copies a payload it forwards as is). Strict: ValueError unless ``packed``
    is one or more whole entries of a known kind and nothing else."""
    spans: list[tuple[bytes, bytes, int, int]] = []
    size = len(packed)
    header = _ENTRY.size
    unpack_from = _ENTRY.unpack_from
    kinds = REPLY_KINDS
    offset = 0
    while offset < size:
        if size - offset < header:
            raise ValueError(f"REPLIES ends with {size - offset} bytes, too few for an entry's header")
        kind, task_id, length = unpack_from(packed, offset)
        if kind not in kinds:
            raise ValueError(f"REPLIES has an entry of unknown kind {kind!r}")
        start = offset + header
        offset = start + length
        if offset > size:
            raise ValueError(f"a REPLIES entry claims {length} bytes, past the end of the message")
        spans.append((kind, task_id, start, offset))
    if not spans:
        raise ValueError("REPLIES carries no reply")
    return spans


def unpack_replies(packed: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The ``(kind, task id, payload)`` entries of a REPLIES frame; ValueError as :func:`reply_spans`."""
    return [(kind, task_id, packed[start:end]) for kind, task_id, start, end in reply_spans(packed)]


def content_digest(data: bytes) -> str:
    """The digest naming a runnable's encoded bytes (TaskHeader.digest): workers cache runnables
    by it, and the broker checks that bytes match it without importing the codec."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def environment() -> dict[str, Any]:
    """What a peer must share with another for objects to cross safely (docs/design.md#serialization).

    Pickled code refers to Python internals that change between minor versions, and LangChain's
    serialized form and cloudpickle's format can change between their minor releases.
    """
    import cloudpickle
    import langchain_core

    return {
        "protocol": PROTOCOL_VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "langchain_core": _major_minor(langchain_core.__version__),
        "cloudpickle": _major_minor(cloudpickle.__version__),
        "host": platform.node(),
    }


# What crosses the wire from a RunnableConfig (docs/design.md#the-warm-path): JSON-safe values of these keys only.
# Callbacks, run_id and run_name belong to the client's run and stay there.
WIRE_CONFIG_KEYS = ("tags", "metadata", "configurable", "recursion_limit", "max_concurrency")

COMPATIBILITY_KEYS = ("protocol", "python", "langchain_core", "cloudpickle")


def incompatibility(client: dict[str, Any], worker: dict[str, Any]) -> str | None:
    """Why two environments cannot exchange objects, or None when they can."""
    problems = [
        f"{key} {client.get(key)} on the client but {worker.get(key)} on the worker"
        for key in COMPATIBILITY_KEYS
        if client.get(key) != worker.get(key)
    ]
    return "; ".join(problems) or None


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


def decode_json_object(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def stdio_line(command: bytes, *fields: bytes) -> bytes:
    """One message as a text line for the stdio transport."""
    return b" ".join([PROTOCOL, COMMAND_NAMES[command].encode(), *map(base64.b64encode, fields)]) + b"\n"


_COMMANDS_BY_NAME = {name.encode(): command for command, name in COMMAND_NAMES.items()}


def parse_stdio_line(line: bytes) -> tuple[bytes, list[bytes]] | None:
    """``(command, fields)`` of a stdio line, or None for a line that is not ours."""
    parts = line.strip().split(b" ")
    if len(parts) < 2 or parts[0] != PROTOCOL or parts[1] not in _COMMANDS_BY_NAME:
        return None
    try:
        return _COMMANDS_BY_NAME[parts[1]], [base64.b64decode(p, validate=True) for p in parts[2:]]
    except ValueError:
        return None


def error_frames(task_id: bytes, code: bytes, message: str, detail: bytes = b"") -> list[bytes]:
    return [PROTOCOL, ERROR, task_id, code, message.encode("utf-8", "replace"), detail]
