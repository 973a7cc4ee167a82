"""Decoding, on the client: bytes a worker sent, back into values, at a cost linear in their size.

``BUILDERS`` maps each tag (``tags``) to the function that rebuilds its value; an unknown tag is
refused. msgpack cannot refer to a value twice, so every element costs at least one byte of the
message; the ``limits`` bound the rest.
"""

from __future__ import annotations

import collections
from typing import Any

import msgpack  # type: ignore[import-untyped]  # (msgpack ships no type hints)

from worker.result_codec.decoding import Build, Decoding, as_bytes, as_dict, as_list
from worker.result_codec.errors import CodecError, Refused
from worker.result_codec.limits import DEFAULT_LIMITS, Limits
from worker.result_codec.objects import build_dataclass, build_enum, build_exception, build_model, build_namedtuple
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
from worker.result_codec.values import (
    build_builtin_type,
    build_complex,
    build_date,
    build_datetime,
    build_decimal,
    build_defaultdict,
    build_deque,
    build_time,
    build_timedelta,
    build_timezone,
    build_uuid,
    build_zoneinfo,
)

BUILDERS: dict[int, Build] = {
    BIGINT: lambda d, payload: d.hashed(int.from_bytes(as_bytes(payload), "big", signed=True)),
    UUID: lambda d, payload: build_uuid(d, as_bytes(payload)),
    DECIMAL: lambda d, payload: build_decimal(d, as_bytes(payload)),
    ZONEINFO: lambda d, payload: build_zoneinfo(d, as_bytes(payload)),
    BUILTIN_TYPE: lambda d, payload: build_builtin_type(d, as_bytes(payload)),
    TUPLE: lambda d, payload: d.hashed(tuple(as_list(payload, "tuple"))),
    SET: lambda d, payload: set(as_list(payload, "set")),
    FROZENSET: lambda d, payload: d.hashed(frozenset(as_list(payload, "frozenset"))),
    COMPLEX: build_complex,
    DATETIME: build_datetime,
    DATE: build_date,
    TIME: build_time,
    TIMEDELTA: build_timedelta,
    TIMEZONE: build_timezone,
    ORDEREDDICT: lambda d, payload: collections.OrderedDict(as_dict(payload, "OrderedDict")),
    DEQUE: build_deque,
    COUNTER: lambda d, payload: collections.Counter(as_dict(payload, "Counter")),
    DEFAULTDICT: build_defaultdict,
    MODEL: build_model,
    DATACLASS: build_dataclass,
    ENUM: build_enum,
    NAMEDTUPLE: build_namedtuple,
    EXCEPTION: build_exception,
}

# What every message starts with: a msgpack list of two (a value) or of three (a tagged value's
# payload and its tag), then the marker.
_PREFIXES = (msgpack.packb([MARKER, None])[:-1], msgpack.packb([MARKER, None, None])[:-2])
_TAGGED = _PREFIXES[1][0]


class _TagInside(Exception):
    """The first pass met a tagged value inside the message's value (see loads_result)."""


def _no_tags_inside(code: int, data: bytes) -> Any:
    raise _TagInside


class _Alone(Decoding):
    """The state of a message whose value is its only tagged value: one value cannot collide with
    others' hashes, and there is no nesting to bound."""

    __slots__ = ()

    def hashed(self, value: Any) -> Any:
        return value


_ALONE = _Alone(0, DEFAULT_LIMITS, BUILDERS)


def loads_result(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode :func:`dumps_result`'s bytes without running, importing or changing anything the
    sender chose, at a cost linear in ``len(data)``.

    Raises :class:`Refused` for bytes of another format (a pickle) or naming what is not data,
    :class:`Unresolvable` when a class is not available here, :class:`CodecError` for malformed
    bytes or bytes over the ``limits``; never anything else.
    """
    if type(data) is not bytes:
        data = bytes(data)  # a bytearray or a memoryview (msgpack would take them; startswith below not all)
    size = len(data)
    if size > limits.max_bytes:
        raise CodecError(f"a result of {size} bytes, over the {limits.max_bytes} bytes this client decodes: refused")
    if not data.startswith(_PREFIXES):
        if data[:1] == b"\x80":
            raise Refused("the bytes are a pickle, which results never are (the worker is of another "
                          "version, or hostile): refused, nothing of it was run")
        raise Refused(f"the bytes are not a result in this client's data format ({MARKER}): refused, "
                      "nothing of it was run")
    try:
        # msgpack checks that the list has the length its first byte says (the prefix checked that).
        if size <= limits.max_items:
            try:
                # A first pass for a message with no tagged value inside its value (a streamed
                # token: a model of plain values): no decoding state to make. A tagged value inside
                # stops it, after at most the message's bytes, and the second pass decodes it all.
                message = msgpack.unpackb(data, ext_hook=_no_tags_inside, strict_map_key=False, timestamp=2)
                decoding: Decoding = _ALONE
            except _TagInside:
                decoding = Decoding(size, limits, BUILDERS)
                message = msgpack.unpackb(data, ext_hook=decoding._ext, strict_map_key=False, timestamp=2)
        else:
            decoding = Decoding(size, limits, BUILDERS)
            message = msgpack.unpackb(data, ext_hook=decoding._ext, strict_map_key=False, timestamp=2,
                                      max_array_len=limits.max_items, max_map_len=limits.max_items)
        if data[0] != _TAGGED:
            return message[1]
        code = message[2]
        build = BUILDERS.get(code)
        if build is None:
            raise Refused(f"a value tagged {code!r}, a type this client does not know (a newer worker?)")
        return build(decoding, message[1])
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever msgpack or a constructor raised: malformed data
        raise CodecError(f"the data cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None
