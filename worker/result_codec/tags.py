"""The tag registry of the result format: the marker every message starts with, the number of
each tagged type, and the few builtin classes data may name.

A message is ``[MARKER, value]``, or ``[MARKER, payload, tag]`` when the value itself is tagged.
Inside, a tagged value is a msgpack ext value, ``ExtType(tag, payload)``: tags below
``FIRST_PACKED_TAG`` have raw bytes as their payload, the others a msgpack value. A number here is
part of the wire format: never reuse one for another type (a newer worker's unknown tag is
refused by an older client, which is the safe failure).
"""

from __future__ import annotations

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
FIRST_PACKED_TAG = 10

# Builtin classes that may appear as values (``{"type": int}``) and as a defaultdict's factory.
BUILTIN_TYPES: dict[str, type] = {t.__name__: t for t in (list, dict, set, frozenset, tuple, int, float, str, bool)}
BUILTIN_TYPE_NAMES = {t: name for name, t in BUILTIN_TYPES.items()}


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
