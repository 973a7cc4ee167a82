"""The way back, worker to client: outputs, streamed chunks, batch items, exceptions and relayed
callback events travel as *data*, never as code or as a pickle.

A client does not trust its workers (a worker may run a tool a prompt-injected model chose). So
the client's decoder must not be made to call, import, mutate or share anything, and its cost must
stay linear in the bytes it is given. A pickle, however filtered, can express references (its memo:
a 223-byte pickle of nested tuples sharing children costs 2**27 hashes), mutation (BUILD sets
attributes on any object the decoder lets through) and calls. This format cannot express any of
them, which is why it is a separate, small module: it is the security boundary, readable alone.

The format
==========

A message is one msgpack value: ``[MARKER, value]``, or ``[MARKER, payload, tag]`` when the value
itself is tagged (a streamed chunk is a model; its payload then needs no second msgpack pass).
Plain values stay native and decode in C: ``str``, ``bytes`` (a ``bytearray`` or ``memoryview``
travels as ``bytes``), ``int`` (64-bit), ``float``, ``bool``, ``None``, ``list`` and ``dict`` (any
keys). Every other supported value is a msgpack *ext* value, ``ExtType(tag, payload)``: the
payload is raw bytes for the few atoms (tags below 10: big int, UUID, Decimal, ZoneInfo key,
builtin class name) and a msgpack value for the others, decoded with the same rules. The decoder
turns it back into an object with the tag's builder (``_BUILDERS``), which checks the payload's
shape; an unknown tag is refused. msgpack cannot refer to a value twice, so every element costs at
least one byte of the message.

Rebuilding objects
==================

Classes are named, never sent: ``"module:qualname"`` and a tracker id. A class is found
(:func:`_find_class`) only in a module that is *already imported* here (nothing is ever imported,
no ``__main__`` submodule), by walking module and class namespaces (never an attribute of anything
else, never a descriptor), and it must be of the kind its tag claims (a pydantic model that is not
a runnable; a dataclass; an Enum; a namedtuple; an Exception). A class the client itself sent by
value is found through cloudpickle's tracker, which only knows classes this process pickled.

Objects are made only through documented constructors: pydantic's ``model_construct`` (the values
are already typed: each was decoded by this module; for the commonest classes its own steps,
inlined: see ``_build_model``), the dataclass's constructor, ``Enum[name]``, a namedtuple's
``_make``, ``datetime(...)``, ``UUID(bytes=...)``, ``Decimal(str)``... never by setting attributes
on an object that existed before decoding (exceptions: see ``_build_exception``). Those
constructors are the classes' own code: only classes of the claimed kind that the client imported
can be named.

Limits
======

Decoding refuses, with a :class:`CodecError`, messages larger than ``Limits.max_bytes``, tagged
values nested deeper than ``Limits.max_depth`` (msgpack itself stops at 1024 nested lists and dicts
within one tagged value), lists and dicts claiming more than ``Limits.max_items`` elements, and
nesting that would make it copy ext payloads more than ``Limits.expansion`` times the message's
size (each tagged value's payload is a copy of its bytes). Dict keys and set elements that are
tagged values (tuples, big ints...) are hashed as they are made, and more than a few *distinct*
values with one hash are refused: Python's hash of those types is not randomized, so an attacker
could otherwise make a dict or set cost time quadratic in its size. Native keys (str and bytes
hashes are randomized; 64-bit ints and floats admit only a few full collisions) need no such check.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import os
import sys
import traceback
import types
import uuid
import weakref
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import cloudpickle
import msgpack  # type: ignore[import-untyped]  # (msgpack ships no type hints)
from langchain_core.runnables import Runnable
from pydantic import BaseModel


class CodecError(Exception):
    """An object could not be encoded or decoded; the message says which and why."""


class Refused(CodecError):
    """Decoding met something that is not data (a function, a class of a kind that is not
    allowed, bytes of another format): nothing was run."""


class Unresolvable(CodecError):
    """A class named in the data is not available on this side (not imported, or no such name)."""


REFUSAL_ADVICE = (
    "Return data: str, bytes, numbers, None, lists, tuples, dicts, sets, LangChain messages and "
    "documents, pydantic models, dataclasses, namedtuples, Enum members, datetime/UUID/Decimal values, "
    "of classes the client can import. Or, if you trust the pool's workers, pass "
    "trust_workers=True to RunnableK8s (or set RUNNABLE_K8S_TRUST_WORKERS=1) to get any "
    "picklable object back."
)


@dataclass(frozen=True)
class Limits:
    """What a decode accepts; beyond it the message is refused before the work it would cost."""

    max_bytes: int = 1 << 30
    #: tagged values within tagged values (each level is a few Python calls, a payload copy and a
    #: msgpack unpacker of ~40 KB on the C stack)
    max_depth: int = 32
    #: elements one list or dict may claim (msgpack allocates a list's items up front)
    max_items: int = 1 << 24
    #: ext payload bytes copied, in all, per byte of message
    expansion: int = 16


DEFAULT_LIMITS = Limits()

#: Distinct tagged values sharing one hash that a message may hold (legitimate data has ~none).
MAX_SAME_HASH = 8
#: The first element of every message: bytes of another format (a pickle) are refused by it.
MARKER = "rk8s-data/1"

# ---------------------------------------------------------------------- tags
#
# A message is ``[MARKER, value]``, or ``[MARKER, payload, tag]`` when the value itself is tagged
# (a streamed chunk is a model: its payload then needs no second msgpack pass). Inside, a tagged
# value is an ext value: ``ExtType(tag, payload)``. Tags below 10 have raw bytes as their payload;
# the others a msgpack value.

PLAIN = 0  # (not on the wire) an encoder's answer meaning "pack this native value instead"
BIGINT, UUID, DECIMAL, ZONEINFO, BUILTIN_TYPE = 1, 3, 4, 5, 6
TUPLE, SET, FROZENSET, COMPLEX = 10, 11, 12, 13
DATETIME, DATE, TIME, TIMEDELTA, TIMEZONE = 14, 15, 16, 17, 18
ORDEREDDICT, DEQUE, COUNTER, DEFAULTDICT = 20, 21, 22, 23
MODEL, DATACLASS, ENUM, NAMEDTUPLE, EXCEPTION = 30, 31, 32, 33, 34
_FIRST_PACKED_TAG = 10

# Builtin classes that may appear as values (``{"type": int}``) and as a defaultdict's factory.
_BUILTIN_TYPES: dict[str, type] = {t.__name__: t for t in (list, dict, set, frozenset, tuple, int, float, str, bool)}
_BUILTIN_TYPE_NAMES = {t: name for name, t in _BUILTIN_TYPES.items()}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
        if code >= _FIRST_PACKED_TAG:
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
    if type(obj) in _NATIVE:
        data = encoder.pack([MARKER, obj], 0)
    else:
        code, payload = _encoder(obj)(obj, 0)
        data = encoder.pack([MARKER, payload] if code == PLAIN else [MARKER, payload, code], 0)
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
    raise Refused(f"a time zone of type {_class_name(type(tz))} (only datetime.timezone and zoneinfo.ZoneInfo)")


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
    if factory is not None and factory not in _BUILTIN_TYPE_NAMES:
        raise Refused(f"a defaultdict whose factory is {factory!r} (only None or a builtin type)")
    return DEFAULTDICT, [None if factory is None else _BUILTIN_TYPE_NAMES[factory], dict(v)]


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
        if obj in _BUILTIN_TYPE_NAMES:
            return lambda v, depth: (BUILTIN_TYPE, _BUILTIN_TYPE_NAMES[v].encode())
        raise Refused(f"the class {_class_name(obj)} (a class is code, not data)")
    head = [f"{cls.__module__}:{cls.__qualname__}", _tracker(cls)]
    if isinstance(obj, BaseModel):
        if isinstance(obj, Runnable):
            raise Refused(f"a runnable ({_class_name(cls)})")
        encode = partial(_model, head, {})
    elif isinstance(obj, enum.Enum):
        encode = partial(_enum, head)
    elif isinstance(obj, BaseException):
        if not isinstance(obj, Exception):
            raise Refused(f"{_class_name(cls)}, which is not an Exception")
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
        raise Refused(f"an object of type {_class_name(cls)}")
    global _ENCODERS
    if len(_ENCODERS) > _MAX_CACHED_ENCODERS:
        _ENCODERS = dict(_BASE_ENCODERS)  # a new dict: another thread may be reading the old one
    _ENCODERS[cls] = encode
    return encode


def _as_base(base: type, obj: Any, depth: int) -> tuple[int, Any]:
    value = base(obj)
    return _bigint(value, depth) if base is int and not -(1 << 63) <= value < (1 << 64) else (PLAIN, value)


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


# ====================================================================== decoding (the client)


_MODULE_DICT: Any = vars(types.ModuleType)["__dict__"].__get__
_CLASS_DICT: Any = vars(type)["__dict__"].__get__


def _find_class(name: Any, tracker: Any) -> type:
    """The class named ``name`` ("module:qualname") here: in a module already imported (nothing is
    imported), through module and class namespaces only (no ``getattr``, no descriptor runs)."""
    if tracker is not None:
        if type(tracker) is not str or len(tracker) > 64:
            raise Refused("a class reference with a malformed tracker id")
        known = cloudpickle.cloudpickle._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker)
        if isinstance(known, type):
            return known
    if type(name) is not str or len(name) > 1000 or name.count(":") != 1:
        raise Refused("a class reference that is not a name (module:qualname)")
    module, qualname = name.split(":")
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts) or "__main__" in parts[1:]:
        raise Refused(f"the module name {module!r}")
    names = qualname.split(".")
    if not all(part.isidentifier() and not (part.startswith("__") and part.endswith("__")) for part in names):
        raise Unresolvable(f"{module}.{qualname} is not a class reachable by name (a local class?)")
    found = sys.modules.get(module)
    if not isinstance(found, types.ModuleType):
        raise Unresolvable(f"{module}.{qualname}: module {module} is not imported here; the client imports "
                           "nothing a worker names, so import it in the client before the call")
    namespace = _MODULE_DICT(found)
    value: Any = None
    for part in names:
        value = namespace.get(part) if isinstance(namespace, (dict, types.MappingProxyType)) else None
        if not isinstance(value, type):
            if value is None:
                raise Unresolvable(f"{module}.{qualname} does not exist here")
            raise Refused(f"{module}.{qualname}, which is not a class")
        namespace = _CLASS_DICT(value)
    return value


def _is_model(cls: type) -> bool:
    return issubclass(cls, BaseModel) and not issubclass(cls, Runnable)


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


_KINDS: dict[int, tuple[str, Callable[[type], bool]]] = {
    MODEL: ("a pydantic model (and not a runnable)", _is_model),
    DATACLASS: ("a dataclass", dataclasses.is_dataclass),
    ENUM: ("an Enum", lambda cls: issubclass(cls, enum.Enum)),
    NAMEDTUPLE: ("a namedtuple", _is_namedtuple),
    EXCEPTION: ("an Exception class", lambda cls: issubclass(cls, Exception)),
}
# Classes found and checked, by (tag, name). Only real classes of the right kind get in, so its
# size is bounded by the classes this process has.
_CLASSES: dict[tuple[int, str], type] = {}


def _class(tag: int, name: Any, tracker: Any) -> Any:
    if tracker is None:
        cached = _CLASSES.get((tag, name))
        if cached is not None:
            return cached
    cls = _find_class(name, tracker)
    kind, test = _KINDS[tag]
    if not test(cls):
        raise Refused(f"{_class_name(cls)}, which is not {kind}")
    if tracker is None:
        _CLASSES[(tag, name)] = cls
    return cls


class _Decoding:
    """The state of one decode: how deep in tagged values it is, how many payload bytes it may
    still copy, and the hashes of the tagged values made so far."""

    __slots__ = ("budget", "depth", "hashes", "limits")

    def __init__(self, size: int, limits: Limits) -> None:
        self.limits = limits
        self.budget = size * limits.expansion + 4096
        self.depth = 1  # the message itself is unpacked by loads_result
        self.hashes: dict[int, list[Any]] | None = None

    def unpack(self, data: bytes) -> Any:
        """The msgpack value ``data`` (the message, or a tagged value's payload); tagged values
        within it come back through :meth:`_ext`, which calls this again for their payloads.

        msgpack bounds what a header may claim by the bytes given (a string by their number, a
        list or dict by that number of elements, each taking at least a byte); ``max_items`` lowers
        the bound for lists and dicts, whose items msgpack allocates up front. Ext type -1
        (msgpack's own timestamp, never written here) decodes as an int.
        """
        limits = self.limits
        if self.depth > limits.max_depth:
            raise CodecError(f"tagged values nested more than {limits.max_depth} deep: refused")
        self.budget -= len(data)
        if self.budget < 0:
            raise CodecError(f"tagged values nested so deeply that decoding would copy more than "
                             f"{limits.expansion} times the message's size: refused")
        self.depth += 1
        try:
            # (The bound method is made per call: kept on the instance it would make a reference
            # cycle, and every decode garbage for the cycle collector.)
            if len(data) <= limits.max_items:
                return msgpack.unpackb(data, ext_hook=self._ext, strict_map_key=False, timestamp=2)
            return msgpack.unpackb(data, ext_hook=self._ext, strict_map_key=False, timestamp=2,
                                   max_array_len=limits.max_items, max_map_len=limits.max_items)
        finally:
            self.depth -= 1

    def _ext(self, code: int, data: bytes) -> Any:
        build = _BUILDERS.get(code)
        if build is None:
            raise Refused(f"a value tagged {code}, a type this client does not know (a newer worker?)")
        return build(self, self.unpack(data) if code >= _FIRST_PACKED_TAG else data)

    def hashed(self, value: Any) -> Any:
        """``value``, after checking that the message has not made too many distinct values with
        its hash (see the module's docstring)."""
        try:
            key = hash(value)
        except TypeError:
            return value  # unhashable: it can be neither a key nor an element of a set
        hashes = self.hashes
        if hashes is None:
            hashes = self.hashes = {}
        same = hashes.get(key)
        if same is None:
            hashes[key] = [value]
        elif value not in same:
            if len(same) >= MAX_SAME_HASH:
                raise Refused(f"more than {MAX_SAME_HASH} distinct values with one hash (a hash-collision attack)")
            same.append(value)
        return value


# A builder: (decoding, payload) -> the value. The payload is bytes for tags below 10, else the
# decoded msgpack value, whose shape the builder checks.
Build = Callable[[_Decoding, Any], Any]


def _list(payload: Any, what: str, length: int | None = None) -> list[Any]:
    if type(payload) is not list or (length is not None and len(payload) != length):
        raise CodecError(f"a malformed {what}")
    return payload


def _dict(payload: Any, what: str) -> dict[Any, Any]:
    if type(payload) is not dict:
        raise CodecError(f"a malformed {what}")
    return payload


def _int(value: Any) -> int:
    if type(value) is not int:
        raise CodecError("a malformed date or time (a part is not an int)")
    return value


def _tz(value: Any) -> Any:
    if value is not None and type(value) not in (datetime.timezone, zoneinfo.ZoneInfo):
        raise CodecError("a malformed time zone")
    return value


def _build_datetime(d: _Decoding, payload: Any) -> Any:
    y, mo, day, h, mi, s, us, tz, fold = _list(payload, "datetime", 9)
    return d.hashed(datetime.datetime(_int(y), _int(mo), _int(day), _int(h), _int(mi), _int(s), _int(us), _tz(tz),
                                      fold=_int(fold)))


def _build_date(d: _Decoding, payload: Any) -> Any:
    y, mo, day = _list(payload, "date", 3)
    return d.hashed(datetime.date(_int(y), _int(mo), _int(day)))


def _build_time(d: _Decoding, payload: Any) -> Any:
    h, mi, s, us, tz, fold = _list(payload, "time", 6)
    return d.hashed(datetime.time(_int(h), _int(mi), _int(s), _int(us), _tz(tz), fold=_int(fold)))


def _build_timedelta(d: _Decoding, payload: Any) -> Any:
    days, seconds, us = _list(payload, "timedelta", 3)
    return d.hashed(datetime.timedelta(days=_int(days), seconds=_int(seconds), microseconds=_int(us)))


def _build_timezone(d: _Decoding, payload: Any) -> Any:
    days, seconds, us, name = _list(payload, "timezone", 4)
    offset = datetime.timedelta(days=_int(days), seconds=_int(seconds), microseconds=_int(us))
    if name is None:
        return datetime.timezone(offset)
    if type(name) is not str:
        raise CodecError("a malformed timezone name")
    return datetime.timezone(offset, name)


_ZONE_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-")
_ZONES: dict[str, zoneinfo.ZoneInfo] = {}


def _build_zoneinfo(d: _Decoding, payload: bytes) -> Any:
    """A ZoneInfo by key, only for a key that is a file of this machine's time-zone database or of
    the ``tzdata`` package when it is imported already: for any other key ZoneInfo would import
    that package's modules to look for it (nothing is imported for a worker)."""
    key = payload.decode()
    zone = _ZONES.get(key)
    if zone is not None:
        return zone
    segments = key.split("/")
    if len(key) > 255 or not all(segment and set(segment) <= _ZONE_KEY_CHARS for segment in segments):
        raise Refused(f"the time-zone key {key[:100]!r}")
    tzdata = sys.modules.get("tzdata")
    tzdata_file = getattr(tzdata, "__file__", None) if isinstance(tzdata, types.ModuleType) else None
    paths = [*zoneinfo.TZPATH, *([os.path.join(os.path.dirname(tzdata_file), "zoneinfo")] if tzdata_file else [])]
    if not any(os.path.isfile(os.path.join(path, *segments)) for path in paths):
        raise Unresolvable(f"the time zone {key} is not in this machine's time-zone database (zoneinfo.TZPATH); "
                           "install it, or import the tzdata package in the client")
    try:
        zone = zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise Unresolvable(f"the time zone {key} does not exist here: {exc}") from exc
    if len(_ZONES) < 1024:
        _ZONES[key] = zone
    return zone


def _build_uuid(d: _Decoding, payload: bytes) -> Any:
    if len(payload) != 16:
        raise CodecError("a malformed UUID")
    return d.hashed(uuid.UUID(bytes=payload))


def _build_decimal(d: _Decoding, payload: bytes) -> Any:
    try:
        return d.hashed(decimal.Decimal(payload.decode()))
    except decimal.InvalidOperation as exc:
        raise CodecError("a malformed Decimal") from exc


def _build_complex(d: _Decoding, payload: Any) -> Any:
    real, imag = _list(payload, "complex", 2)
    if type(real) is not float or type(imag) is not float:
        raise CodecError("a malformed complex")
    return d.hashed(complex(real, imag))


def _build_deque(d: _Decoding, payload: Any) -> Any:
    items, maxlen = _list(payload, "deque", 2)
    if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
        raise CodecError("a malformed deque")
    return collections.deque(_list(items, "deque"), maxlen)


def _build_defaultdict(d: _Decoding, payload: Any) -> Any:
    name, values = _list(payload, "defaultdict", 2)
    factory = _BUILTIN_TYPES.get(name) if type(name) is str else None
    if name is not None and factory is None:
        raise CodecError("a malformed defaultdict factory")
    return collections.defaultdict(factory, _dict(values, "defaultdict"))


def _build_builtin_type(d: _Decoding, payload: bytes) -> Any:
    found = _BUILTIN_TYPES.get(payload.decode())
    if found is None:
        raise Refused(f"the class {payload[:100]!r}, which is not one of the builtin types data may name")
    return found


def _str_keys(values: Any, what: str) -> Any:
    """``values`` (a dict or a list), checked to be or to have str keys."""
    if type(values) not in (dict, list) or not all(type(key) is str for key in values):
        raise CodecError(f"malformed values for {what}")
    return values


class _ModelShape(NamedTuple):
    """What decoding needs to know of a model class, read once per class (a tuple: the hot path
    unpacks it at once)."""

    cls: Any
    names: list[str]  # the fields, in the class's order
    fields: str  # the same, as the worker writes them ("a,b,c")
    allowed: frozenset[str]  # what a fields set may name (the fields)
    extra: bool  # model_config extra="allow": values that are not fields are kept
    #: model_construct's steps reduce to setting the four slots of a fresh instance: no field has
    #: an alias (or one equal to its name), there is no post-init (nor private attributes, which
    #: pydantic initialises there) and the model is not a RootModel
    plain: bool
    hashable: bool
    new: Any  # cls.__new__
    fields_sets: dict[int, frozenset[str]]  # by bit mask, as met (at most _MAX_FIELDS_SETS)


_MAX_FIELDS_SETS = 256
# Model classes found and checked, with their shapes, by name (see _CLASSES), and the shapes of
# classes found through cloudpickle's tracker (which come and go with the code that sent them).
_MODELS: dict[str, _ModelShape] = {}
_TRACKED_SHAPES: weakref.WeakKeyDictionary[type, _ModelShape] = weakref.WeakKeyDictionary()
_object_setattr = object.__setattr__


def _model_shape(name: Any, tracker: Any) -> _ModelShape:
    cls = _class(MODEL, name, tracker)
    if tracker is not None:
        shape = _TRACKED_SHAPES.get(cls)
        if shape is not None:
            return shape
    fields = cls.__pydantic_fields__
    plain = not cls.__pydantic_root_model__ and not cls.__pydantic_post_init__ and all(
        field.alias in (None, key) and field.validation_alias in (None, key) for key, field in fields.items())
    shape = _ModelShape(cls, list(fields), ",".join(fields), frozenset(fields),
                        cls.model_config.get("extra") == "allow", plain, cls.__hash__ is not None, cls.__new__, {})
    if tracker is None:
        _MODELS[name] = shape
    else:
        _TRACKED_SHAPES[cls] = shape
    return shape


def _fields_set(shape: _ModelShape, names: list[str], same: bool, mask: Any) -> set[str]:
    """The names a bit mask over ``names`` selects."""
    if type(mask) is not int or mask < 0 or mask >> len(names):
        raise CodecError(f"a malformed fields set for {_class_name(shape.cls)}")
    cached = shape.fields_sets.get(mask) if same else None
    if cached is None:
        cached = frozenset(name for i, name in enumerate(names) if mask >> i & 1)
        if same and len(shape.fields_sets) < _MAX_FIELDS_SETS:
            shape.fields_sets[mask] = cached
    return set(cached)


def _build_model(d: _Decoding, payload: Any) -> Any:
    if type(payload) is not list or len(payload) != 8:
        raise CodecError("a malformed pydantic model")
    name, tracker, fields, values, mask, set_extra, extra, private = payload
    shape = _MODELS.get(name) if tracker is None else None
    if shape is None:
        shape = _model_shape(name, tracker)
    cls, names, fields_here, allowed, keeps_extra, plain, hashable, new, fields_sets = shape
    same = fields == fields_here
    if not same:
        names = _field_names(fields, cls)
    if type(values) is not list or len(values) != len(names) or (extra is not None and type(extra) is not dict):
        raise CodecError(f"a malformed state for {_class_name(cls)}")
    cached = fields_sets.get(mask) if same else None
    fields_set = set(cached) if cached is not None else _fields_set(shape, names, same, mask)
    if set_extra is not None:
        if type(set_extra) is not list or not extra or not set(set_extra) <= extra.keys():
            raise CodecError(f"a malformed fields set for {_class_name(cls)}")
        fields_set.update(set_extra)
    values = dict(zip(names, values, strict=False))  # (of one length: checked above)
    if plain and same and not extra and not private:
        # Exactly what model_construct does for such a class when every field has a value (its
        # loop over the fields, looking each up by alias and by name, is most of its cost): a
        # fresh instance from the class's own __new__, then its four slots.
        obj = new(cls)  # the class's own __new__, as model_construct calls it
        set_slot = _object_setattr
        set_slot(obj, "__dict__", values)
        set_slot(obj, "__pydantic_fields_set__", fields_set)
        set_slot(obj, "__pydantic_extra__", {} if keeps_extra else None)
        set_slot(obj, "__pydantic_private__", None)
    else:
        if extra:
            values = {**_str_keys(extra, _class_name(cls)), **values}
        if "_fields_set" in values:
            raise CodecError(f"a field named _fields_set in {_class_name(cls)}")
        obj = cls.model_construct(fields_set & (allowed | values.keys()), **values)
        if private:
            # Private attributes (the data ones the worker sent) of the fresh instance, through
            # pydantic's own assignment, for the names the class declares.
            declared = cls.__private_attributes__
            for key, value in _str_keys(private, _class_name(cls)).items():
                if key in declared:
                    setattr(obj, key, value)
    return d.hashed(obj) if hashable else obj


def _field_names(fields: Any, cls: type) -> list[str]:
    """The worker's field names, when they are not this class's (another version of it)."""
    if type(fields) is not str:
        raise CodecError(f"malformed field names for {_class_name(cls)}")
    names = fields.split(",") if fields else []
    if not all(name.isidentifier() for name in names):
        raise CodecError(f"malformed field names for {_class_name(cls)}")
    return names


def _build_dataclass(d: _Decoding, payload: Any) -> Any:
    name, tracker, values = _list(payload, "dataclass", 3)
    cls = _class(DATACLASS, name, tracker)
    obj = cls(**_str_keys(_dict(values, _class_name(cls)), _class_name(cls)))
    return obj if cls.__hash__ is None else d.hashed(obj)


def _build_enum(d: _Decoding, payload: Any) -> Any:
    name, tracker, member = _list(payload, "Enum member", 3)
    cls = _class(ENUM, name, tracker)
    if type(member) is not str:
        raise CodecError(f"a malformed member name for {_class_name(cls)}")
    try:
        return cls[member]
    except KeyError:
        raise Unresolvable(f"{_class_name(cls)} has no member {member[:100]!r} here") from None


def _build_namedtuple(d: _Decoding, payload: Any) -> Any:
    name, tracker, values = _list(payload, "namedtuple", 3)
    cls = _class(NAMEDTUPLE, name, tracker)
    return d.hashed(cls._make(_list(values, _class_name(cls))))


def _builtin_base(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__ == "builtins":
            return base
    return BaseException


def _build_exception(d: _Decoding, payload: Any) -> Any:
    name, tracker, args, state, notes = _list(payload, "exception", 5)
    cls = _class(EXCEPTION, name, tracker)
    if type(args) is not list or type(state) is not dict or not all(
            type(key) is str and key.isidentifier() and not key.startswith("__") for key in state) or (
            notes is not None and (type(notes) is not list or not all(type(note) is str for note in notes))):
        raise CodecError(f"a malformed state for {_class_name(cls)}")
    # A built-in exception type runs its own C code (which sets errno, name...). Any other class
    # gets a FRESH instance from its built-in base's __new__, so no Python code of the class runs
    # (an exception's __init__ often demands arguments that are not data, such as an HTTP
    # response); its data attributes then go into that fresh instance's own __dict__, which
    # nothing else refers to yet (no descriptor or __setattr__ of the class runs either).
    exc = cls(*args) if cls.__module__ == "builtins" else _builtin_base(cls).__new__(cls, *args)
    exc.__dict__.update(state)
    for note in notes or ():
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10
            exc.__dict__.setdefault("__notes__", []).append(note)
    return exc


def _bytes(payload: Any) -> bytes:
    if type(payload) is not bytes:
        raise CodecError("a malformed raw payload")
    return payload


_BUILDERS: dict[int, Build] = {
    BIGINT: lambda d, payload: d.hashed(int.from_bytes(_bytes(payload), "big", signed=True)),
    UUID: lambda d, payload: _build_uuid(d, _bytes(payload)),
    DECIMAL: lambda d, payload: _build_decimal(d, _bytes(payload)),
    ZONEINFO: lambda d, payload: _build_zoneinfo(d, _bytes(payload)),
    BUILTIN_TYPE: lambda d, payload: _build_builtin_type(d, _bytes(payload)),
    TUPLE: lambda d, payload: d.hashed(tuple(_list(payload, "tuple"))),
    SET: lambda d, payload: set(_list(payload, "set")),
    FROZENSET: lambda d, payload: d.hashed(frozenset(_list(payload, "frozenset"))),
    COMPLEX: _build_complex,
    DATETIME: _build_datetime,
    DATE: _build_date,
    TIME: _build_time,
    TIMEDELTA: _build_timedelta,
    TIMEZONE: _build_timezone,
    ORDEREDDICT: lambda d, payload: collections.OrderedDict(_dict(payload, "OrderedDict")),
    DEQUE: _build_deque,
    COUNTER: lambda d, payload: collections.Counter(_dict(payload, "Counter")),
    DEFAULTDICT: _build_defaultdict,
    MODEL: _build_model,
    DATACLASS: _build_dataclass,
    ENUM: _build_enum,
    NAMEDTUPLE: _build_namedtuple,
    EXCEPTION: _build_exception,
}

# What every message starts with: a msgpack list of two (a value) or of three (a tagged value's
# payload and its tag), then the marker.
_PREFIXES = (msgpack.packb([MARKER, None])[:-1], msgpack.packb([MARKER, None, None])[:-2])
_TAGGED = _PREFIXES[1][0]


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
    decoding = _Decoding(size, limits)
    try:
        # msgpack checks that the list has the length its first byte says (the prefix checked that).
        if size <= limits.max_items:
            message = msgpack.unpackb(data, ext_hook=decoding._ext, strict_map_key=False, timestamp=2)
        else:
            message = msgpack.unpackb(data, ext_hook=decoding._ext, strict_map_key=False, timestamp=2,
                                      max_array_len=limits.max_items, max_map_len=limits.max_items)
        if data[0] != _TAGGED:
            return message[1]
        code = message[2]
        build = _BUILDERS.get(code)
        if build is None:
            raise Refused(f"a value tagged {code!r}, a type this client does not know (a newer worker?)")
        return build(decoding, message[1])
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever msgpack or a constructor raised: malformed data
        raise CodecError(f"the data cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None


# ====================================================================== exceptions


@dataclass
class RemoteExceptionInfo:
    """An exception as it arrived from the other side.

    ``exception`` is the rebuilt exception of the original type when it could be rebuilt,
    else None (the client then raises ``RemoteError`` with the type name and traceback).
    """

    type_name: str
    message: str
    traceback: str
    exception: BaseException | None


def dump_exception(exc: BaseException, encode: Callable[[Any], bytes] = dumps_result,
                   decode: Callable[[bytes], Any] = loads_result) -> bytes:
    """Encode an exception with its traceback text as data; never fails.

    The exception itself travels too when ``encode`` can write it and ``decode`` read it back
    (as data by default; ``worker.codec`` passes its pickler when the client trusts its workers).
    Otherwise only its type name, message and traceback do, and the client raises ``RemoteError``.
    """
    info: dict[str, Any] = {
        "type_name": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "exception": None,
    }
    try:
        encoded = encode(exc)
        decode(encoded)  # an exception that encodes but cannot be rebuilt is common
        info["exception"] = encoded
    except Exception:  # noqa: BLE001 - the text above still travels
        pass
    return dumps_result(info)


def load_exception(data: bytes, decode: Callable[[bytes], Any] = loads_result) -> RemoteExceptionInfo:
    """Decode :func:`dump_exception`'s bytes; the remote traceback is attached as a note.

    The envelope is always data; the exception inside is read with ``decode`` (data by default).
    Raises :class:`Refused` when the bytes name something that is not data (nothing was run);
    an exception whose class is not available here comes back with ``exception`` None.
    """
    try:
        info = loads_result(data)
    except Refused:
        raise
    except CodecError as exc:
        return RemoteExceptionInfo("unknown", f"undecodable remote error ({exc})", "", None)
    if not isinstance(info, dict) or not all(
            isinstance(info.get(key), str) for key in ("type_name", "message", "traceback")):
        return RemoteExceptionInfo("unknown", "undecodable remote error (malformed detail)", "", None)
    rebuilt = None
    if isinstance(info.get("exception"), bytes):
        try:
            rebuilt = decode(info["exception"])
        except Refused:
            raise
        except CodecError:  # the type is not available here: RemoteError
            rebuilt = None
    if isinstance(rebuilt, BaseException):
        rebuilt.remote_traceback = info["traceback"]  # type: ignore[attr-defined]
        if hasattr(rebuilt, "add_note"):
            rebuilt.add_note("Remote traceback (on the worker):\n" + info["traceback"].rstrip())
    else:
        rebuilt = None
    return RemoteExceptionInfo(info["type_name"], info["message"], info["traceback"], rebuilt)
