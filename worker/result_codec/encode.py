"""Encoding, on the worker: an output, a chunk, a callback event or an exception as data.

Plain values stay native msgpack; every other supported value becomes an ext value through its
encoder (``_ENCODERS``, by exact type, then one made per class by ``_encoder_for``). Anything that
is not data (a function, a class, a runnable, a live object) is refused with a :class:`Refused`
naming it and saying what to return instead. This side is the worker's, so its cost matters less
than the decoder's safety, but a streamed chunk is encoded per token: hence the packer reuse, and a
model class's encoder is a plan made once (``_model_plan``: its field names joined once, its values
read with one ``itemgetter``), which an instance takes only when it holds exactly those fields.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import operator
import uuid
import zoneinfo
from collections.abc import Callable
from functools import partial
from typing import Any

import cloudpickle
import msgpack  # type: ignore[import-untyped]  # (msgpack ships no type hints)
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from worker.result_codec.errors import REFUSAL_ADVICE, Refused
from worker.result_codec.limits import DEFAULT_LIMITS
from worker.result_codec.tags import (
    BIGINT,
    BUILTIN_TYPE,
    BUILTIN_TYPE_NAMES,
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
    FIRST_PACKED_TAG,
    FROZENSET,
    MARKER,
    MODEL,
    NAMEDTUPLE,
    ORDEREDDICT,
    PLAIN,
    SET,
    TIME,
    TIMEDELTA,
    TIMEZONE,
    TUPLE,
    UUID,
    ZONEINFO,
    class_name,
)

# ====================================================================== encoding (the worker)


def _tracker(cls: type) -> str | None:
    return cloudpickle.cloudpickle._DYNAMIC_CLASS_TRACKER_BY_CLASS.get(cls)


class _Encoder:
    """One encoding's msgpack packers, one per depth of tagged values (a packer is busy while its
    value's tagged children are packed by the next). Kept in a free list and reused: making a
    Packer costs more than packing a short string."""

    __slots__ = ("packers",)

    def __init__(self) -> None:
        self.packers: list[msgpack.Packer] = []

    def pack(self, obj: Any, depth: int) -> bytes:
        packers = self.packers
        if depth >= len(packers):
            if depth > DEFAULT_LIMITS.max_depth:
                raise Refused(f"values nested more than {DEFAULT_LIMITS.max_depth} tagged values deep "
                              "(tuples, models, dataclasses...) or referring to themselves")
            while len(packers) <= depth:
                packers.append(msgpack.Packer(default=partial(self.tag, len(packers) + 1), use_bin_type=True,
                                              strict_types=True, datetime=False, buf_size=4096))
        return packers[depth].pack(obj)

    def tag(self, depth: int, obj: Any) -> Any:
        """msgpack's ``default``: ``obj`` (not of a native type) as an ext value whose payload is
        packed at ``depth``, or as the native value msgpack then packs."""
        code, payload = _encoder(obj)(obj, depth)
        if code >= FIRST_PACKED_TAG:
            return msgpack.ExtType(code, self.pack(payload, depth))
        return payload if code == PLAIN else msgpack.ExtType(code, payload)


_FREE_ENCODERS: list[_Encoder] = []
_MAX_FREE_ENCODERS = 16
_KEEP_BUFFER_BELOW = 1 << 20  # an encoder whose buffers grew past this is dropped, not kept
_NATIVE = frozenset({str, bytes, int, float, bool, type(None), list, dict})


def _encode(obj: Any) -> bytes:
    try:
        encoder = _FREE_ENCODERS.pop()
    except IndexError:
        encoder = _Encoder()
    cls = type(obj)
    if cls in _NATIVE:
        message = [MARKER, obj]
    else:
        code, payload = (_ENCODERS.get(cls) or _encoder_for(cls, obj))(obj, 0)
        message = [MARKER, payload] if code == PLAIN else [MARKER, payload, code]
    packers = encoder.packers
    data = packers[0].pack(message) if packers else encoder.pack(message, 0)
    if len(data) < _KEEP_BUFFER_BELOW and len(_FREE_ENCODERS) < _MAX_FREE_ENCODERS:
        _FREE_ENCODERS.append(encoder)  # not after a failure either: its packers may be mid-way
    return data


# An encoder: (value, depth) -> (tag, payload): raw bytes for tags below 10, a value to pack for
# the others, or (PLAIN, a native value).
Encode = Callable[[Any, int], tuple[int, Any]]


def _bigint(obj: int, depth: int) -> tuple[int, Any]:
    return BIGINT, obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)


def _tz_payload(tz: Any) -> Any:
    if tz is None or type(tz) in (datetime.timezone, zoneinfo.ZoneInfo):
        return tz
    raise Refused(f"a time zone of type {class_name(type(tz))} (only datetime.timezone and zoneinfo.ZoneInfo)")


def _datetime(v: datetime.datetime, depth: int) -> tuple[int, Any]:
    return DATETIME, [v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, _tz_payload(v.tzinfo),
                      v.fold]


def _time(v: datetime.time, depth: int) -> tuple[int, Any]:
    return TIME, [v.hour, v.minute, v.second, v.microsecond, _tz_payload(v.tzinfo), v.fold]


def _timezone(v: datetime.timezone, depth: int) -> tuple[int, Any]:
    offset = v.utcoffset(None)
    # The name only when one was given: timezone(offset) calls itself "UTC+01:00" by itself.
    name: str | None = v.tzname(None)
    if name == datetime.timezone(offset).tzname(None):
        name = None
    return TIMEZONE, [offset.days, offset.seconds, offset.microseconds, name]


def _zoneinfo(v: zoneinfo.ZoneInfo, depth: int) -> tuple[int, Any]:
    if not isinstance(v.key, str):
        raise Refused("a ZoneInfo made from a file, without a key")
    return ZONEINFO, v.key.encode()


def _defaultdict(v: collections.defaultdict[Any, Any], depth: int) -> tuple[int, Any]:
    factory = v.default_factory
    if factory is not None and factory not in BUILTIN_TYPE_NAMES:
        raise Refused(f"a defaultdict whose factory is {factory!r} (only None or a builtin type)")
    return DEFAULTDICT, [None if factory is None else BUILTIN_TYPE_NAMES[factory], dict(v)]


_ENCODERS: dict[type, Encode] = {
    tuple: lambda v, depth: (TUPLE, list(v)),
    set: lambda v, depth: (SET, list(v)),
    frozenset: lambda v, depth: (FROZENSET, list(v)),
    int: _bigint,  # an exact int reaches ``default`` only when it does not fit in 64 bits
    datetime.datetime: _datetime,
    datetime.date: lambda v, depth: (DATE, [v.year, v.month, v.day]),
    datetime.time: _time,
    datetime.timedelta: lambda v, depth: (TIMEDELTA, [v.days, v.seconds, v.microseconds]),
    datetime.timezone: _timezone,
    zoneinfo.ZoneInfo: _zoneinfo,
    uuid.UUID: lambda v, depth: (UUID, v.bytes),
    decimal.Decimal: lambda v, depth: (DECIMAL, str(v).encode()),
    complex: lambda v, depth: (COMPLEX, [v.real, v.imag]),
    bytearray: lambda v, depth: (PLAIN, bytes(v)),  # (as msgpack writes one nested in a value)
    memoryview: lambda v, depth: (PLAIN, bytes(v)),
    collections.OrderedDict: lambda v, depth: (ORDEREDDICT, dict(v)),
    collections.deque: lambda v, depth: (DEQUE, [list(v), v.maxlen]),
    collections.Counter: lambda v, depth: (COUNTER, dict(v)),
    collections.defaultdict: _defaultdict,
}
_BASE_ENCODERS = dict(_ENCODERS)
_MAX_CACHED_ENCODERS = 4096  # classes seen, each with its encoder (by-value classes come and go)


def _encoder(obj: Any) -> Encode:
    encode = _ENCODERS.get(type(obj))
    return encode if encode is not None else _encoder_for(type(obj), obj)


def _encoder_for(cls: type, obj: Any) -> Encode:
    """The encoder of an instance of ``cls`` that is not a builtin value type, cached per class;
    raises :class:`Refused` naming what is not data."""
    encode: Encode
    if isinstance(obj, type):
        if obj in BUILTIN_TYPE_NAMES:
            return lambda v, depth: (BUILTIN_TYPE, BUILTIN_TYPE_NAMES[v].encode())
        raise Refused(f"the class {class_name(obj)} (a class is code, not data)")
    head = [f"{cls.__module__}:{cls.__qualname__}", _tracker(cls)]
    if isinstance(obj, BaseModel):
        if isinstance(obj, Runnable):
            raise Refused(f"a runnable ({class_name(cls)})")
        encode = _model_plan(cls, head)
    elif isinstance(obj, enum.Enum):
        encode = partial(_enum, head)
    elif isinstance(obj, BaseException):
        if not isinstance(obj, Exception):
            raise Refused(f"{class_name(cls)}, which is not an Exception")
        encode = partial(_exception, head)
    elif dataclasses.is_dataclass(obj):
        encode = partial(_dataclass, head, tuple(f.name for f in dataclasses.fields(obj) if f.init))
    elif isinstance(obj, tuple) and isinstance(getattr(cls, "_fields", None), tuple):
        encode = partial(_namedtuple, head)
    elif isinstance(obj, (str, int, float)):  # LangChain's TextAccessor, numpy.float64: as the plain value
        encode = partial(_as_base, next(base for base in (str, int, float) if isinstance(obj, base)))
    elif callable(obj) and hasattr(obj, "__qualname__"):
        raise Refused(f"the function {getattr(obj, '__module__', None)}.{obj.__qualname__} (code, not data)")
    else:
        raise Refused(f"an object of type {class_name(cls)}")
    global _ENCODERS
    if len(_ENCODERS) > _MAX_CACHED_ENCODERS:
        _ENCODERS = dict(_BASE_ENCODERS)  # a new dict: another thread may be reading the old one
    _ENCODERS[cls] = encode
    return encode


def _as_base(base: type, obj: Any, depth: int) -> tuple[int, Any]:
    value = base(obj)
    return _bigint(value, depth) if base is int and not -(1 << 63) <= value < (1 << 64) else (PLAIN, value)


def _model_plan(cls: type[BaseModel], head: list[Any]) -> Encode:
    """The encoder of ``cls``'s instances: a plan made once per class, as a streamed chunk's class
    is the same for every token. It reads an instance's values with one ``itemgetter`` over the
    class's fields and writes the class's field names as one string made here, once.

    The plan is checked against each instance, not trusted: only an instance whose ``__dict__``
    holds exactly the plan's names (as many keys, each found) and no private values takes it, so
    what is sent is always that instance's own values under their own names, even if the class
    was rebuilt with other fields since. Any other instance takes :func:`_model`, which reads it
    afresh."""
    names = tuple(cls.__pydantic_fields__)
    by_order: dict[str, dict[str, int]] = {}
    if len(names) < 2:  # (itemgetter of one name returns the value, not a tuple: no plan needed)
        return partial(_model, head, by_order)
    name, tracker = head
    fields = ",".join(names)
    count = len(names)
    read = operator.itemgetter(*names)
    bits = {field: 1 << i for i, field in enumerate(names)}
    get_bit = bits.get

    def encode(obj: BaseModel, depth: int) -> tuple[int, Any]:
        values = obj.__dict__
        if len(values) == count and not obj.__pydantic_private__:
            try:
                ordered = read(values)
            except KeyError:
                return _model(head, by_order, obj, depth)
            mask = 0
            set_extra: list[str] | None = None
            for field in obj.__pydantic_fields_set__:
                bit = get_bit(field)
                if bit is None:
                    set_extra = [*(set_extra or ()), field]
                else:
                    mask |= bit
            return MODEL, [name, tracker, fields, list(ordered), mask, set_extra, obj.__pydantic_extra__ or None,
                           None]
        return _model(head, by_order, obj, depth)

    return encode


def _model(head: list[Any], bits_by_fields: dict[str, dict[str, int]], obj: BaseModel, depth: int) -> tuple[int, Any]:
    """A model's field names (one string, "a,b,c"), its values in that order, the fields set (a
    bit per field, and the names of extra values set), its extra and private values. The client
    pairs the values with its own class's names when they are the same: msgpack would otherwise
    make and intern a string per name, which costs more than the rest of a chunk."""
    private = obj.__pydantic_private__
    if private:
        private = {name: value for name, value in private.items() if _is_data(value, depth)}
    values = obj.__dict__
    fields = ",".join(values)
    bits = bits_by_fields.get(fields)
    if bits is None:
        bits = {name: 1 << i for i, name in enumerate(values)}
        if len(bits_by_fields) < 16:  # (one per order of the fields met: one, unless built oddly)
            bits_by_fields[fields] = bits
    mask = 0
    set_extra: list[str] | None = None
    for name in obj.__pydantic_fields_set__:
        bit = bits.get(name)
        if bit is None:
            set_extra = [*(set_extra or ()), name]
        else:
            mask |= bit
    return MODEL, [*head, fields, list(values.values()), mask, set_extra, obj.__pydantic_extra__ or None,
                   private or None]


def _enum(head: list[Any], obj: enum.Enum, depth: int) -> tuple[int, Any]:
    return ENUM, [*head, obj.name]


def _dataclass(head: list[Any], names: tuple[str, ...], obj: Any, depth: int) -> tuple[int, Any]:
    return DATACLASS, [*head, {name: getattr(obj, name) for name in names}]


def _namedtuple(head: list[Any], obj: tuple[Any, ...], depth: int) -> tuple[int, Any]:
    return NAMEDTUPLE, [*head, list(obj)]


def _exception(head: list[Any], exc: BaseException, depth: int) -> tuple[int, Any]:
    """An exception's class, args, and those of its attributes that are data (an HTTP response
    object stays on the worker); its notes too."""
    state = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        if isinstance(key, str) and key.isidentifier() and not key.startswith("__") and _is_data(value, depth):
            state[key] = value
    notes = getattr(exc, "__notes__", None)
    notes = [note for note in notes if isinstance(note, str)] if isinstance(notes, list) else None
    return EXCEPTION, [*head, list(exc.args), state, notes]


def _is_data(value: Any, depth: int) -> bool:
    """Whether ``value`` encodes (with packers of its own: the caller's are busy)."""
    try:
        _Encoder().pack(value, depth + 1)
    except Exception:  # noqa: BLE001 - any failure means: not data, left out
        return False
    return True


def dumps_result(obj: Any) -> bytes:
    """Encode an output, a chunk, an event or an exception as data; raises :class:`Refused` (a
    CodecError) saying what is not data and what to return instead."""
    try:
        return _encode(obj)
    except Refused as exc:
        raise Refused(f"cannot send {type(obj).__name__} back as data: it contains {exc}. {REFUSAL_ADVICE}") from exc
    except RecursionError as exc:
        raise Refused(f"cannot send {type(obj).__name__} back as data: it is nested too deeply or "
                      f"refers to itself. {REFUSAL_ADVICE}") from exc
    except Exception as exc:
        raise Refused(f"cannot send {type(obj).__name__} back as data: {type(exc).__name__}: {exc}. "
                      f"{REFUSAL_ADVICE}") from exc
