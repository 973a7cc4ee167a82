"""The way back, worker to client: outputs, streamed chunks, batch items, exceptions and relayed
callback events travel as *data*, never as code or as a pickle.

A client does not trust its workers (a worker may run a tool a prompt-injected model chose). So
the client's decoder must not be made to call, import, mutate or share anything, and its cost must
stay linear in the bytes it is given. A pickle, however filtered, can express references (its memo:
a 223-byte pickle of nested tuples sharing children costs 2**27 hashes), mutation (BUILD sets
attributes on any object the decoder lets through) and calls. This format cannot express any of
them. It is the security boundary, so it is a package of its own that imports nothing of the way
out (``worker.outbound``), readable alone:

* ``tags``: the tag registry (which number is which type; the message marker);
* ``limits``: what a decode accepts (size, depth, items, copying, hash collisions);
* ``encode``: the worker's side, ``dumps_result``;
* ``decode``: the client's side, ``loads_result``, with ``decoding`` (the state of one decode),
  ``values`` (builtin value types), ``objects`` (instances of the client's classes) and
  ``classes`` (finding a class by name without importing or calling anything);
* ``exceptions``: an exception's envelope, ``dump_exception`` / ``load_exception``;
* ``errors``: ``CodecError`` and its kinds.

The format
==========

A message is one msgpack value: ``[MARKER, value]``, or ``[MARKER, payload, tag]`` when the value
itself is tagged (a streamed chunk is a model; its payload then needs no second msgpack pass).
Plain values stay native and decode in C: ``str``, ``bytes`` (a ``bytearray`` or ``memoryview``
travels as ``bytes``), ``int`` (64-bit), ``float``, ``bool``, ``None``, ``list`` and ``dict`` (any
keys). Every other supported value is a msgpack *ext* value, ``ExtType(tag, payload)``: the
payload is raw bytes for the few atoms (tags below 10: big int, UUID, Decimal, ZoneInfo key,
builtin class name) and a msgpack value for the others, decoded with the same rules. The decoder
turns it back into an object with the tag's builder (``decode.BUILDERS``), which checks the
payload's shape; an unknown tag is refused. msgpack cannot refer to a value twice, so every
element costs at least one byte of the message.

The names below are this package's public surface; ``worker.codec`` re-exports the ones its
callers use.
"""

from worker.result_codec.decode import loads_result as loads_result
from worker.result_codec.encode import dumps_result as dumps_result
from worker.result_codec.errors import REFUSAL_ADVICE as REFUSAL_ADVICE
from worker.result_codec.errors import CodecError as CodecError
from worker.result_codec.errors import Refused as Refused
from worker.result_codec.errors import Unresolvable as Unresolvable
from worker.result_codec.exceptions import RemoteExceptionInfo as RemoteExceptionInfo
from worker.result_codec.exceptions import dump_exception as dump_exception
from worker.result_codec.exceptions import load_exception as load_exception
from worker.result_codec.limits import DEFAULT_LIMITS as DEFAULT_LIMITS
from worker.result_codec.limits import MAX_SAME_HASH as MAX_SAME_HASH
from worker.result_codec.limits import Limits as Limits
from worker.result_codec.tags import (
    BIGINT,
    BUILTIN_TYPE,
    COMPLEX,
    COUNTER,
    DATACLASS,
    DATE,
    DATETIME,
    DECIMAL,
    DEFAULTDICT,
    DEQUE,
    ENUM,
    EXCEPTION,
    FROZENSET,
    MARKER,
    MODEL,
    NAMEDTUPLE,
    ORDEREDDICT,
    SET,
    TIME,
    TIMEDELTA,
    TIMEZONE,
    TUPLE,
    UUID,
    ZONEINFO,
)

__all__ = [
    "BIGINT", "BUILTIN_TYPE", "COMPLEX", "COUNTER", "DATACLASS", "DATE", "DATETIME", "DECIMAL", "DEFAULTDICT",
    "DEFAULT_LIMITS", "DEQUE", "ENUM", "EXCEPTION", "FROZENSET", "MARKER", "MAX_SAME_HASH", "MODEL", "NAMEDTUPLE",
    "ORDEREDDICT", "REFUSAL_ADVICE", "SET", "TIME", "TIMEDELTA", "TIMEZONE", "TUPLE", "UUID", "ZONEINFO",
    "CodecError", "Limits", "Refused", "RemoteExceptionInfo", "Unresolvable", "dump_exception", "dumps_result",
    "load_exception", "loads_result",
]
