"""Serialization of runnables and inputs, the way out to a worker (docs/design.md says why it is
not the format of the way back).

The way back (outputs, chunks, exceptions, callback events) is data, not pickle:
:mod:`worker.result_codec`, whose names this module re-exports. Only a client that trusts its
workers gets outputs pickled by :func:`dumps` (``dumps_output(obj, trusted=True)``).

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
* Module-level sentinels (``MISSING = object()`` in a library, as LangGraph's ``PASSTHROUGH``)
  travel by reference, module and attribute name, so ``is`` checks hold on the worker; the worker
  must be able to import that module (see "Module-level sentinels" below).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import sys
import threading
import types
import warnings
from typing import Any, Literal

import cloudpickle
from langchain_core.load import dumpd, load
from langchain_core.load.serializable import Serializable
from langchain_core.runnables import Runnable

# The way back (worker to client) is data, not pickle: worker.result_codec, the security boundary,
# readable alone. Its names are re-exported here for the callers that take both directions from
# this module.
from worker import result_codec
from worker.protocol import content_digest as protocol_digest
from worker.result_codec import REFUSAL_ADVICE as REFUSAL_ADVICE
from worker.result_codec import CodecError as CodecError
from worker.result_codec import Refused as Refused
from worker.result_codec import RemoteExceptionInfo as RemoteExceptionInfo
from worker.result_codec import Unresolvable as Unresolvable
from worker.result_codec import dumps_result as dumps_result
from worker.result_codec import loads_result as loads_result

# Which LangChain classes load() may rebuild on a worker. Whoever can submit a task already runs
# arbitrary code there (cloudpickle), so "all" adds no new power; it is named explicitly because
# load()'s default ("core") refuses integrations such as ChatOpenAI. Workers can narrow it.
ALLOWED_OBJECTS_ENV = "RUNNABLE_K8S_ALLOWED_OBJECTS"
DEFAULT_ALLOWED_OBJECTS = "all"
AllowedObjects = Literal["all", "core", "messages"]
_ALLOWED_CHOICES: tuple[AllowedObjects, ...] = ("all", "core", "messages")

# load() is marked beta and warns on every call; one warning per rebuilt model is noise.
warnings.filterwarnings("ignore", message=r"The function `load` is in beta")


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


def _incomplete_fields(tree: Any) -> list[str]:
    """The top-level fields of a ``dumpd`` tree that hold a ``not_implemented`` node."""
    if isinstance(tree, dict) and tree.get("type") == "not_implemented":
        kwargs = None
    else:
        kwargs = tree.get("kwargs") if isinstance(tree, dict) else None
    if not isinstance(kwargs, dict):
        return []
    return sorted(str(name) for name, value in kwargs.items() if not _is_complete(value))


# ---------------------------------------------------------------------- module-level sentinels
#
# A library's ``MISSING = object()`` is compared with ``is``; pickled by value it comes back as a
# new object and every such check fails (a compiled LangGraph graph stops working after one plain
# cloudpickle round trip: ``PASSTHROUGH``, ``MISSING``...). So an instance of exactly ``object``
# that is a module-level name of an importable module travels as a reference: ``_sentinel`` with
# the names it has (a sentinel is often re-exported; the worker takes the first it can import).
# A few module-level singletons of another class that LangGraph also compares with ``is`` are
# named in ``_NAMED_SINGLETONS``; nothing else is.
#
# The encoding side never imports anything: it indexes by identity the module-level ``object()``
# instances of the modules already in ``sys.modules`` (not ``__main__``, not modules without an
# import spec), the first time it meets an exact ``object`` instance, and again, for the modules
# imported since, when it meets one it does not know and ``len(sys.modules)`` changed (the first
# scan reads every module's namespace once: tens of milliseconds with LangChain and LangGraph
# imported; later ones read only the new modules). A runnable with no exact ``object`` instance in
# it pays a type test and a look-up in a dict of two per object; data (the C pickler) pays the type
# test only (the named singletons live inside graphs, which take the hybrid route). Modules
# registered with ``cloudpickle.register_pickle_by_value`` keep travelling by value.

_NAMED_SINGLETONS = frozenset({
    ("langgraph.pregel._read", "DEFAULT_BOUND"),  # a RunnableCallable; PregelNode checks ``is DEFAULT_BOUND``
    ("langgraph.store.base", "NOT_PROVIDED"),     # NotProvided(); ``ttl is NOT_PROVIDED``
})
#: At most this many names travel per sentinel (and are tried on the receiving side).
_MAX_SENTINEL_NAMES = 4
# A module's namespace, read through ModuleType's own descriptor (not the module's class).
_MODULE_DICT: Any = vars(types.ModuleType)["__dict__"].__get__
_NOT_SCANNED = ("__main__", "__mp_main__")


class _SentinelIndex:
    """Module-level sentinels by identity; the index holds them, so an id is never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[int, tuple[object, list[tuple[str, str]]]] = {}
        self._scanned: set[str] = set()
        self._modules_scanned = -1
        self._named: dict[int, tuple[object, list[tuple[str, str]]]] = {}
        self._modules_named = -1

    def named(self) -> dict[int, tuple[object, list[tuple[str, str]]]]:
        """The ``_NAMED_SINGLETONS`` whose modules are imported, by id (cheap: once per encoding)."""
        if len(sys.modules) != self._modules_named:
            with self._lock:
                self._modules_named = len(sys.modules)
                named: dict[int, tuple[object, list[tuple[str, str]]]] = {}
                for module_name, attribute in sorted(_NAMED_SINGLETONS):
                    namespace = _namespace(sys.modules.get(module_name))
                    if namespace is not None and attribute in namespace:
                        value = namespace[attribute]
                        named[id(value)] = (value, [(module_name, attribute)])
                self._named = named
        return self._named

    def names(self, obj: object) -> tuple[tuple[str, str], ...] | None:
        """The names ``obj`` (an exact ``object`` instance) has at module level, or None."""
        entry = self._objects.get(id(obj))
        if entry is None and len(sys.modules) != self._modules_scanned:
            self._scan()
            entry = self._objects.get(id(obj))
        if entry is None:
            return None
        return _usable_names(entry[1])

    def _scan(self) -> None:
        with self._lock:
            modules = list(sys.modules.items())
            self._modules_scanned = len(modules)
            for module_name, module in modules:
                if module_name in self._scanned:
                    continue
                self._scanned.add(module_name)
                if module_name.split(".", 1)[0] in _NOT_SCANNED:
                    continue
                namespace = _namespace(module)
                if namespace is None or namespace.get("__spec__") is None:
                    continue  # not a module, or one that cannot be imported by name
                for attribute, value in list(namespace.items()):
                    if type(value) is object and isinstance(attribute, str):
                        entry = self._objects.setdefault(id(value), (value, []))
                        entry[1].append((module_name, attribute))


def _namespace(module: Any) -> dict[str, Any] | None:
    """A module's own namespace, read without calling anything of its class (a lazy module's
    ``__getattribute__`` would import it)."""
    if not isinstance(module, types.ModuleType):
        return None
    try:
        namespace = _MODULE_DICT(module)
    except Exception:  # noqa: BLE001 - a module object of an odd kind: not scanned
        return None
    return namespace if type(namespace) is dict else None


def _usable_names(names: list[tuple[str, str]]) -> tuple[tuple[str, str], ...] | None:
    """The names to send: not in a module pickled by value; real module names before aliases."""
    by_value = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())
    usable = [
        (module_name, attribute) for module_name, attribute in names
        if not any(module_name == m or module_name.startswith(m + ".") for m in by_value)
    ]
    if not usable:
        return None

    def rank(name: tuple[str, str]) -> tuple[bool, int, str, str]:
        namespace = _namespace(sys.modules.get(name[0]))
        alias = namespace is None or namespace.get("__name__") != name[0]
        return alias, name[0].count("."), name[0], name[1]

    return tuple(sorted(usable, key=rank)[:_MAX_SENTINEL_NAMES])


_SENTINELS = _SentinelIndex()


def _sentinel_reduction(obj: object, named: dict[int, tuple[object, list[tuple[str, str]]]]) -> Any:
    """The reduction of a module-level sentinel (``_sentinel`` and its names), or None."""
    if type(obj) is object:
        names = _SENTINELS.names(obj)
    else:
        entry = named.get(id(obj))
        names = tuple(entry[1]) if entry is not None and entry[0] is obj else None
    return (_sentinel, names) if names else None


def _sentinel(*names: Any) -> Any:
    """Runs on the receiving side, called by pickle: the sentinel named ``module.attribute``.

    Only a single attribute of a module is looked up, in the module's namespace (no ``getattr``,
    no chain), and it must be an instance of exactly ``object`` there, or one of the few named
    singletons; anything else is refused with a :class:`CodecError`.
    """
    if not 1 <= len(names) <= _MAX_SENTINEL_NAMES or not all(
            type(name) is tuple and len(name) == 2 and all(type(part) is str for part in name) for name in names):
        raise CodecError("a malformed sentinel reference (expected 1 to "
                         f"{_MAX_SENTINEL_NAMES} (module, attribute) pairs of strings)")
    problems = []
    for module_name, attribute in names:
        parts = module_name.split(".")
        if not all(part.isidentifier() for part in parts) or parts[0] in _NOT_SCANNED or not attribute.isidentifier():
            raise CodecError(f"a sentinel reference to {module_name!r}.{attribute!r}, which is not a module "
                             "attribute name: refused")
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # noqa: BLE001 - reported below, with the other names tried
                problems.append(f"module {module_name} cannot be imported here ({type(exc).__name__}: {exc})")
                continue
        namespace = _namespace(module)
        if namespace is None or attribute not in namespace:
            problems.append(f"{module_name}.{attribute} does not exist here")
            continue
        value = namespace[attribute]
        if type(value) is object or (module_name, attribute) in _NAMED_SINGLETONS:
            return value
        raise CodecError(f"the sentinel {module_name}.{attribute} is a {type(value).__module__}."
                         f"{type(value).__qualname__} here, not a module-level object(): refused")
    first_module, first_attribute = names[0]
    raise CodecError(
        f"the sentinel {first_module}.{first_attribute} (a module-level object() the sender refers to) "
        f"cannot be found on this side: {'; '.join(problems)}. Install the module that defines it, "
        "at the sender's version, where the object is decoded"
    )


class _HybridPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, named: dict[int, tuple[object, list[tuple[str, str]]]]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._named = named

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is object or id(obj) in self._named:
            sentinel = _sentinel_reduction(obj, self._named)
            if sentinel is not None:
                return sentinel
        # Classes are never Serializable *instances*; skip them cheaply.
        if isinstance(obj, Serializable) and not isinstance(obj, type):
            secrets = _declared_secrets(obj)
            tree = None
            if obj.is_lc_serializable():
                try:
                    tree = dumpd(obj)
                except Exception:  # noqa: BLE001 - any failure means: not this route
                    tree = None
                if tree is not None and _is_complete(tree):
                    return _rebuild_langchain_object, (tree,)
            if secrets:
                # No secret by value: cloudpickle would copy the key into the bytes in the clear.
                raise CodecError(_secret_by_value_message(obj, tree, secrets))
        # Falling back to cloudpickle's own reducer (not NotImplemented) keeps closures working.
        return super().reducer_override(obj)


def _declared_secrets(obj: Serializable) -> dict[str, str]:
    try:
        secrets = obj.lc_secrets
    except Exception:  # noqa: BLE001 - a broken property declares nothing we can honour
        return {}
    return secrets if isinstance(secrets, dict) else {}


def _secret_by_value_message(obj: Any, tree: Any, secrets: dict[str, str]) -> str:
    name = type(obj).__qualname__
    if tree is None:
        reason = "it does not support LangChain serialization (dumpd)"
    else:
        fields = _incomplete_fields(tree)
        reason = ("these fields cannot be serialized as data: " + ", ".join(fields)) if fields else (
            "part of it cannot be serialized as data")
    return (
        f"{name} declares secrets ({', '.join(sorted(secrets))}) but {reason}; sending it by value "
        "would copy the secret into the bytes in the clear, so it is refused. Replace the "
        "unserializable fields (a lambda, a client object) with serializable settings, or build "
        f"the {name} inside a function that runs on the worker, where its secret comes from the "
        "worker's environment."
    )


class _NeedsHybrid(Exception):
    pass


class _DataPickler(pickle.Pickler):
    """The C pickler, for plain data (inputs, outputs, streamed chunks): about 15x cheaper than
    the hybrid pickler on an ``AIMessageChunk``. It gives up (and the hybrid route is taken) at
    any runnable or any LangChain object that declares secrets, so those keep the ``dumpd`` route
    and secrets stay out of the bytes."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is object:  # module-level object() sentinels (not the named singletons: see above)
            names = _SENTINELS.names(obj)
            if names:
                return _sentinel, names
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
        _HybridPickler(buffer, _SENTINELS.named()).dump(obj)
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


digest = protocol_digest  # the content digest naming a runnable (worker.protocol: the broker needs it too)


# ---------------------------------------------------------------------- the way back, per call
#
# Data (worker.result_codec) unless the client trusts its workers; then this module's pickler,
# which carries any object. The choice lives here, on the side that knows both formats, so the
# data module never imports the pickling one.


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
