"""What a decode accepts (the security boundary's budget).

Decoding refuses, with a ``CodecError``, messages larger than ``Limits.max_bytes``, tagged values
nested deeper than ``Limits.max_depth`` (msgpack itself stops at 1024 nested lists and dicts
within one tagged value), lists and dicts claiming more than ``Limits.max_items`` elements, and
nesting that would make it copy ext payloads more than ``Limits.expansion`` times the message's
size (each tagged value's payload is a copy of its bytes). Dict keys and set elements that are
tagged values (tuples, big ints...) are hashed as they are made, and more than
``MAX_SAME_HASH`` *distinct* values with one hash are refused: Python's hash of those types is
not randomized, so an attacker could otherwise make a dict or set cost time quadratic in its
size. Native keys (str and bytes hashes are randomized; 64-bit ints and floats admit only a few
full collisions) need no such check.
"""

from __future__ import annotations

from dataclasses import dataclass


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
