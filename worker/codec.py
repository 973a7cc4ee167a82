"""Serialization of runnables, inputs, outputs and exceptions (DESIGN §3).

Neither tool alone is enough. cloudpickle carries plain Python code (a lambda with a closure,
a local class) but fails on a ChatOpenAI, which holds live HTTP clients and locks, and it would
carry an API key in the clear. LangChain's ``dumpd`` carries a ChatOpenAI as data and writes its
API key as a *reference* that the worker resolves from its own environment, but it cannot carry
a RunnableLambda. So one cloudpickle pickler does both: each LangChain-serializable object whose
``dumpd`` tree is complete is replaced, at any depth, by a call that rebuilds it with
``langchain_core.load.load`` on the receiving side; everything else is cloudpickled.

What to know when using it (the README repeats this):

* Fields that LangChain marks ``exclude=True`` (a ``rate_limiter``, a custom ``http_client``,
  ``callbacks``, ``cache``) do not travel with a LangChain-serialized object; the worker builds
  its own defaults.
* Anything pickled *by value*, such as a key captured in a lambda's closure, travels in the clear
  inside the (CurveZMQ-encrypted) channel. Keep secrets in the worker's environment instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import cloudpickle
from langchain_core.load import dumpd, load
from langchain_core.load.serializable import Serializable
from langchain_core.runnables import Runnable

# Which LangChain classes load() may rebuild on a worker. Whoever can submit a task already runs
# arbitrary code there (cloudpickle), so "all" adds no new power; it is named explicitly because
# load()'s default ("core") refuses integrations such as ChatOpenAI. Workers can narrow it.
ALLOWED_OBJECTS_ENV = "RUNNABLE_K8S_ALLOWED_OBJECTS"
DEFAULT_ALLOWED_OBJECTS = "all"
AllowedObjects = Literal["all", "core", "messages"]
_ALLOWED_CHOICES: tuple[AllowedObjects, ...] = ("all", "core", "messages")

# load() is marked beta and warns on every call; one warning per rebuilt model is noise.
warnings.filterwarnings("ignore", message=r"The function `load` is in beta")


class CodecError(Exception):
    """An object could not be encoded or decoded; the message says which and why."""


def _rebuild_langchain_object(data: dict[str, Any]) -> Any:
    """Runs on the receiving side, called by pickle: the inverse of the ``dumpd`` route."""
    return load(data, allowed_objects=_allowed_objects(), secrets_from_env=True)


def _allowed_objects() -> AllowedObjects:
    value = os.environ.get(ALLOWED_OBJECTS_ENV, DEFAULT_ALLOWED_OBJECTS)
    for choice in _ALLOWED_CHOICES:
        if value == choice:
            return choice
    raise CodecError(f"{ALLOWED_OBJECTS_ENV}={value!r} is not one of: {', '.join(_ALLOWED_CHOICES)}")


def _is_complete(tree: Any) -> bool:
    """False if any node of a ``dumpd`` tree is ``not_implemented`` (it would not load)."""
    if isinstance(tree, dict):
        if tree.get("type") == "not_implemented":
            return False
        return all(_is_complete(value) for value in tree.values())
    if isinstance(tree, list):
        return all(_is_complete(value) for value in tree)
    return True


class _HybridPickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Classes are never Serializable *instances*; skip them cheaply.
        if isinstance(obj, Serializable) and not isinstance(obj, type) and obj.is_lc_serializable():
            try:
                tree = dumpd(obj)
            except Exception:  # noqa: BLE001 - any failure means: not this route
                tree = None
            if tree is not None and _is_complete(tree):
                return _rebuild_langchain_object, (tree,)
        # Falling back to cloudpickle's own reducer (not NotImplemented) keeps closures working.
        return super().reducer_override(obj)


class _NeedsHybrid(Exception):
    pass


class _DataPickler(pickle.Pickler):
    """The C pickler, for plain data (inputs, outputs, streamed chunks): about 15x cheaper than
    the hybrid pickler on an ``AIMessageChunk``. It gives up (and the hybrid route is taken) at
    any runnable or any LangChain object that declares secrets, so those keep the ``dumpd`` route
    and secrets stay out of the bytes."""

    def reducer_override(self, obj: Any) -> Any:
        if (isinstance(obj, Serializable) and not isinstance(obj, type)
                and (isinstance(obj, Runnable) or obj.lc_secrets)):
            raise _NeedsHybrid
        return NotImplemented


def _dumps_data(obj: Any) -> bytes | None:
    """``obj`` with the C pickler, or None when it must take the hybrid route: it cannot be
    pickled by reference, or it refers to ``__main__`` or to a module registered to be pickled by
    value (the other side may not have them: cloudpickle carries such objects by value)."""
    buffer = io.BytesIO()
    try:
        _DataPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001 - lambdas, local classes, live resources, runnables: hybrid
        return None
    data = buffer.getvalue()
    if b"__main__" in data:
        return None
    # Modules given to cloudpickle.register_pickle_by_value() travel by value: only cloudpickle
    # honours that, so data naming one of them takes the hybrid route too.
    for module in getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ()):
        if module.encode() in data:
            return None
    return data


def dumps(obj: Any) -> bytes:
    """Encode any object; raises :class:`CodecError` naming the object that could not travel.

    Runnables always take the hybrid route (their digest names them in worker caches, and their
    secrets must become references); plain data takes the C pickler when it can.
    """
    if not isinstance(obj, Runnable):
        data = _dumps_data(obj)
        if data is not None:
            return data
    buffer = io.BytesIO()
    try:
        _HybridPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception as exc:
        raise CodecError(
            f"cannot serialize {type(obj).__name__}: {exc}. Objects that hold live resources "
            "(open files, sockets, locks, clients) cannot be sent; create them inside the "
            "runnable instead, or use a LangChain object that supports dumpd()."
        ) from exc
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """Decode what :func:`dumps` produced; raises :class:`CodecError` if it cannot be rebuilt."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise CodecError(
            f"cannot deserialize: {type(exc).__name__}: {exc}. Usually a module the object needs "
            "is missing on this side, or a secret it references is not in this environment."
        ) from exc


def digest(data: bytes) -> str:
    """Content digest used to name a runnable in the worker caches."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


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


def dump_exception(exc: BaseException) -> bytes:
    """Encode an exception with its traceback text; never fails."""
    info: dict[str, Any] = {
        "type_name": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "pickled": None,
    }
    try:
        pickled = dumps(exc)
        pickle.loads(pickled)  # an exception that pickles but cannot unpickle is common
        info["pickled"] = pickled
    except Exception:  # noqa: BLE001 - the text above still travels
        pass
    return pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL)


def load_exception(data: bytes) -> RemoteExceptionInfo:
    """Decode :func:`dump_exception`'s bytes; the remote traceback is attached as a note."""
    try:
        info = pickle.loads(data)
    except Exception as exc:  # noqa: BLE001
        return RemoteExceptionInfo("unknown", f"undecodable remote error ({exc})", "", None)
    rebuilt = None
    if info.get("pickled") is not None:
        try:
            rebuilt = pickle.loads(info["pickled"])
        except Exception:  # noqa: BLE001 - the type is not importable here: RemoteError
            rebuilt = None
    if isinstance(rebuilt, BaseException):
        rebuilt.remote_traceback = info["traceback"]  # type: ignore[attr-defined]
        if hasattr(rebuilt, "add_note"):
            rebuilt.add_note("Remote traceback (on the worker):\n" + info["traceback"].rstrip())
    else:
        rebuilt = None
    return RemoteExceptionInfo(info["type_name"], info["message"], info["traceback"], rebuilt)
