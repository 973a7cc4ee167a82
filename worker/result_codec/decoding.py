"""The state of one decode, shared by every builder: depth, the copy budget, the hashes made.

Also the shape checks builders use on a payload (a list of a given length, a dict, str keys,
raw bytes): a payload is whatever the sender wrote, so each builder checks before it reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]  # (msgpack ships no type hints)

from worker.result_codec.errors import CodecError, Refused
from worker.result_codec.limits import MAX_SAME_HASH, Limits
from worker.result_codec.tags import (
    FIRST_PACKED_TAG,
)


class Decoding:
    """The state of one decode: how deep in tagged values it is, how many payload bytes it may
    still copy, and the hashes of the tagged values made so far."""

    __slots__ = ("budget", "builders", "depth", "hashes", "limits")

    def __init__(self, size: int, limits: Limits, builders: dict[int, Build]) -> None:
        self.limits = limits
        self.builders = builders  # (``decode.BUILDERS``: given, so that builders may import this module)
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
        build = self.builders.get(code)
        if build is None:
            raise Refused(f"a value tagged {code}, a type this client does not know (a newer worker?)")
        return build(self, self.unpack(data) if code >= FIRST_PACKED_TAG else data)

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
Build = Callable[[Decoding, Any], Any]


def as_list(payload: Any, what: str, length: int | None = None) -> list[Any]:
    if type(payload) is not list or (length is not None and len(payload) != length):
        raise CodecError(f"a malformed {what}")
    return payload


def as_dict(payload: Any, what: str) -> dict[Any, Any]:
    if type(payload) is not dict:
        raise CodecError(f"a malformed {what}")
    return payload


def str_keys(values: Any, what: str) -> Any:
    """``values`` (a dict or a list), checked to be or to have str keys."""
    if type(values) not in (dict, list) or not all(type(key) is str for key in values):
        raise CodecError(f"malformed values for {what}")
    return values


def as_bytes(payload: Any) -> bytes:
    if type(payload) is not bytes:
        raise CodecError("a malformed raw payload")
    return payload
