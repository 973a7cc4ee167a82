"""Builders of builtin value types (dates and times, UUID, Decimal, time zones, complex, deque,
defaultdict, builtin classes): each checks its payload's shape and calls the type's own
constructor."""

from __future__ import annotations

import collections
import datetime
import decimal
import os
import sys
import types
import uuid
import zoneinfo
from typing import Any

from worker.result_codec.decoding import Decoding, as_dict, as_list
from worker.result_codec.errors import CodecError, Refused, Unresolvable
from worker.result_codec.tags import (
    BUILTIN_TYPES,
)


def _int(value: Any) -> int:
    if type(value) is not int:
        raise CodecError("a malformed date or time (a part is not an int)")
    return value


def _tz(value: Any) -> Any:
    if value is not None and type(value) not in (datetime.timezone, zoneinfo.ZoneInfo):
        raise CodecError("a malformed time zone")
    return value


def build_datetime(d: Decoding, payload: Any) -> Any:
    y, mo, day, h, mi, s, us, tz, fold = as_list(payload, "datetime", 9)
    return d.hashed(datetime.datetime(_int(y), _int(mo), _int(day), _int(h), _int(mi), _int(s), _int(us), _tz(tz),
                                      fold=_int(fold)))


def build_date(d: Decoding, payload: Any) -> Any:
    y, mo, day = as_list(payload, "date", 3)
    return d.hashed(datetime.date(_int(y), _int(mo), _int(day)))


def build_time(d: Decoding, payload: Any) -> Any:
    h, mi, s, us, tz, fold = as_list(payload, "time", 6)
    return d.hashed(datetime.time(_int(h), _int(mi), _int(s), _int(us), _tz(tz), fold=_int(fold)))


def build_timedelta(d: Decoding, payload: Any) -> Any:
    days, seconds, us = as_list(payload, "timedelta", 3)
    return d.hashed(datetime.timedelta(days=_int(days), seconds=_int(seconds), microseconds=_int(us)))


def build_timezone(d: Decoding, payload: Any) -> Any:
    days, seconds, us, name = as_list(payload, "timezone", 4)
    offset = datetime.timedelta(days=_int(days), seconds=_int(seconds), microseconds=_int(us))
    if name is None:
        return datetime.timezone(offset)
    if type(name) is not str:
        raise CodecError("a malformed timezone name")
    return datetime.timezone(offset, name)


_ZONE_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-")
_ZONES: dict[str, zoneinfo.ZoneInfo] = {}


def build_zoneinfo(d: Decoding, payload: bytes) -> Any:
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


def build_uuid(d: Decoding, payload: bytes) -> Any:
    if len(payload) != 16:
        raise CodecError("a malformed UUID")
    return d.hashed(uuid.UUID(bytes=payload))


def build_decimal(d: Decoding, payload: bytes) -> Any:
    try:
        return d.hashed(decimal.Decimal(payload.decode()))
    except decimal.InvalidOperation as exc:
        raise CodecError("a malformed Decimal") from exc


def build_complex(d: Decoding, payload: Any) -> Any:
    real, imag = as_list(payload, "complex", 2)
    if type(real) is not float or type(imag) is not float:
        raise CodecError("a malformed complex")
    return d.hashed(complex(real, imag))


def build_deque(d: Decoding, payload: Any) -> Any:
    items, maxlen = as_list(payload, "deque", 2)
    if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
        raise CodecError("a malformed deque")
    return collections.deque(as_list(items, "deque"), maxlen)


def build_defaultdict(d: Decoding, payload: Any) -> Any:
    name, values = as_list(payload, "defaultdict", 2)
    factory = BUILTIN_TYPES.get(name) if type(name) is str else None
    if name is not None and factory is None:
        raise CodecError("a malformed defaultdict factory")
    return collections.defaultdict(factory, as_dict(values, "defaultdict"))


def build_builtin_type(d: Decoding, payload: bytes) -> Any:
    found = BUILTIN_TYPES.get(payload.decode())
    if found is None:
        raise Refused(f"the class {payload[:100]!r}, which is not one of the builtin types data may name")
    return found
