"""The way back's format for one call: data (``worker.result_codec``) unless the client trusts
its workers, then the way out's pickler (``worker.outbound``), which carries any object.

The choice lives here, on the side that knows both formats, so that the data package (the
security boundary) never imports the pickling one.
"""

from __future__ import annotations

from typing import Any

from worker import result_codec
from worker.outbound import dumps, loads
from worker.result_codec import RemoteExceptionInfo, dumps_result, loads_result


def dumps_output(obj: Any, trusted: bool) -> bytes:
    """An output or chunk for the way back: data only, or anything picklable when the client
    trusts its workers."""
    return dumps(obj) if trusted else dumps_result(obj)


def loads_output(data: bytes, trusted: bool) -> Any:
    """Decode :func:`dumps_output`'s bytes; a full unpickle only when the client trusts its workers."""
    return loads(data) if trusted else loads_result(data)


def dump_exception(exc: BaseException, trusted: bool = False) -> bytes:
    """An exception for the way back (``result_codec.dump_exception``), the exception itself
    pickled inside the data envelope when the client trusts its workers."""
    return result_codec.dump_exception(exc, dumps, loads) if trusted else result_codec.dump_exception(exc)


def load_exception(data: bytes, trusted: bool = False) -> RemoteExceptionInfo:
    """Decode :func:`dump_exception`'s bytes (``result_codec.load_exception``)."""
    return result_codec.load_exception(data, loads if trusted else loads_result)
