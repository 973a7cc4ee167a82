"""An exception on the way back: its type name, message and traceback as data, and the
exception itself when it can travel (as data, or pickled when the client trusts its workers)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.result_codec.decode import loads_result
from worker.result_codec.encode import dumps_result
from worker.result_codec.errors import CodecError, Refused


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
