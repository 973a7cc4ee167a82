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
* Module-level sentinels (``MISSING = object()`` in a library, as LangGraph's ``PASSTHROUGH``)
  travel by reference, module and attribute name, so ``is`` checks hold on the worker; the worker
  must be able to import that module (see "Module-level sentinels" below).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import importlib
import io
import os
import pickle
import sys
import threading
import traceback
import types
import uuid
import warnings
import zoneinfo
from dataclasses import dataclass
from typing import Any, Literal

import cloudpickle
from langchain_core.load import dumpd, load
from langchain_core.load.serializable import Serializable
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from worker.protocol import content_digest as protocol_digest

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


def dump_exception(exc: BaseException, trusted: bool = False) -> bytes:
    """Encode an exception with its traceback text as data; never fails.

    The exception itself travels too when it can be rebuilt: as data (:func:`dumps_result`), or
    pickled when the client trusts its workers. Otherwise only its type name, message and
    traceback do, and the client raises ``RemoteError``.
    """
    info: dict[str, Any] = {
        "type_name": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "pickled": None,
    }
    try:
        encoded = dumps(exc) if trusted else dumps_result(exc)
        loads_output(encoded, trusted)  # an exception that encodes but cannot be rebuilt is common
        info["pickled"] = encoded
    except Exception:  # noqa: BLE001 - the text above still travels
        pass
    return dumps_result(info)


def load_exception(data: bytes, trusted: bool = False) -> RemoteExceptionInfo:
    """Decode :func:`dump_exception`'s bytes; the remote traceback is attached as a note.

    Raises :class:`Refused` when the bytes name something that is not data (nothing was run);
    an exception whose class is not importable here comes back with ``exception`` None.
    """
    try:
        info = loads_result(data)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001
        return RemoteExceptionInfo("unknown", f"undecodable remote error ({exc})", "", None)
    if not isinstance(info, dict) or not all(
            isinstance(info.get(key), str) for key in ("type_name", "message", "traceback")):
        return RemoteExceptionInfo("unknown", "undecodable remote error (malformed detail)", "", None)
    rebuilt = None
    if isinstance(info.get("pickled"), bytes):
        try:
            rebuilt = loads_output(info["pickled"], trusted)
        except Refused:
            raise
        except Exception:  # noqa: BLE001 - the type is not importable here: RemoteError
            rebuilt = None
    if isinstance(rebuilt, BaseException):
        rebuilt.remote_traceback = info["traceback"]  # type: ignore[attr-defined]
        if hasattr(rebuilt, "add_note"):
            rebuilt.add_note("Remote traceback (on the worker):\n" + info["traceback"].rstrip())
    else:
        rebuilt = None
    return RemoteExceptionInfo(info["type_name"], info["message"], info["traceback"], rebuilt)


# ---------------------------------------------------------------------- the way back: data only
#
# Outputs, streamed chunks and exceptions travel back as *data* (DESIGN §3, §5): a client does not
# trust its workers, so decoding must never run code the worker chose. The format is still pickle
# (the C unpickler is the fastest decoder there is), restricted the way Python's documentation
# describes ("restricting globals"): the client's ``find_class`` admits only the names in
# ``_SAFE_GLOBALS`` below. No class of the user's or of a library is ever handed to the unpickler.
# Instances of those are written by the worker as calls of the four rebuild functions
# (``_model``, ``_dataclass``, ``_enum``, ``_exception``, ``_namedtuple``) with the class *name*
# and the instance's state; each looks the class up itself, checks that it is of its kind, and
# rebuilds the instance without calling the class's ``__init__`` or ``__new__``:
#
# * pydantic models (LangChain messages, documents, generations, prompt values, the result of
#   ``with_structured_output``): ``object.__new__`` and what pydantic's ``__setstate__`` does;
# * dataclasses: ``object.__new__`` and ``object.__setattr__`` per field;
# * Enum members: looked up by name; namedtuples: ``tuple.__new__``;
# * exceptions (subclasses of ``Exception`` only: a remote ``SystemExit`` is not raised here):
#   the built-in exception type's own ``__new__`` with the arguments, then the attributes.
#
# The pickle machinery can still call a few methods on objects already rebuilt (``append``,
# ``extend``, ``add``, ``__setitem__``, ``__setstate__``, ``__setattr__``, ``__getattr__``,
# ``__call__``, ``__del__``, ``get``), so a class that defines any of those itself (rather than
# inheriting pydantic's, the exception base's or ``object``'s) is refused. A class is found by
# name only in a module whose top-level package is already imported on the client (never a
# ``__main__`` submodule), or, for a class the client sent by value (cloudpickle), through
# cloudpickle's own tracker, which only knows classes this process itself pickled.


class Refused(CodecError):
    """Decoding met something that is not data (a function, a class of a kind that is not
    allowed): nothing was run."""


class Unresolvable(CodecError):
    """A class named in the data is not importable on this side."""


REFUSAL_ADVICE = (
    "Return data: str, bytes, numbers, None, lists, tuples, dicts, sets, LangChain messages and "
    "documents, pydantic models, dataclasses, Enum members, datetime/UUID/Decimal values, of "
    "classes the client can import. Or, if you trust the pool's workers, pass "
    "trust_workers=True to RunnableK8s (or set RUNNABLE_K8S_TRUST_WORKERS=1) to get any "
    "picklable object back."
)

# Methods that opcodes of a pickle can call on an object that is already on the unpickler's
# stack; a class defining one of them itself is refused.
_STACK_METHODS = ("__call__", "append", "extend", "add", "__setitem__", "__setstate__", "__setattr__",
                  "__getattr__", "__getattribute__", "__del__", "get")
_TRUSTED_DEFINERS_MODULES = ("builtins", "pydantic.main", "enum")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_CHECKED: dict[type, str | None] = {}


def _stack_method_problem(cls: type) -> str | None:
    """Why instances of ``cls`` cannot be rebuilt from untrusted data, or None."""
    try:
        return _CHECKED[cls]
    except KeyError:
        pass
    problem = None
    frozen_dataclass = dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for base in cls.__mro__:
        if base.__module__ in _TRUSTED_DEFINERS_MODULES:
            continue
        for name in _STACK_METHODS:
            if name in vars(base):
                if frozen_dataclass and name == "__setattr__":
                    continue  # the generated one, which only raises FrozenInstanceError
                problem = (f"{_class_name(cls)} defines {name}() (in {_class_name(base)}), which decoding "
                           "could be made to call")
                break
        if problem:
            break
    _CHECKED[cls] = problem
    return problem


def _class_ref(cls: type) -> tuple[str, str, str | None]:
    tracker = cloudpickle.cloudpickle._DYNAMIC_CLASS_TRACKER_BY_CLASS.get(cls)
    return cls.__module__, cls.__qualname__, tracker


_RESOLVED: dict[tuple[str, str], type] = {}


def _resolve(module: Any, qualname: Any, tracker: Any) -> type:
    """The class named ``module.qualname`` on this side, without importing anything new at top
    level, without running descriptors, and without following anything but modules and classes."""
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise Refused("a class reference that is not two names")
    if tracker is not None:
        if not isinstance(tracker, str):
            raise Refused("a class reference with a bad tracker id")
        known = cloudpickle.cloudpickle._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker)
        if isinstance(known, type):
            return known
    key = (module, qualname)
    cached = _RESOLVED.get(key)
    if cached is not None:
        return cached
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts) or "__main__" in parts[1:]:
        raise Refused(f"the module name {module!r}")
    names = qualname.split(".")
    if not all(name.isidentifier() and not (name.startswith("__") and name.endswith("__")) for name in names):
        raise Unresolvable(f"{module}.{qualname} is not a class reachable by name (a local class?)")
    found = sys.modules.get(module)
    if found is None:
        if parts[0] not in sys.modules or module == "__main__":
            raise Unresolvable(f"module {module} is not imported on this side; import it in the client")
        try:
            found = importlib.import_module(module)
        except Exception as exc:
            raise Unresolvable(f"module {module} cannot be imported on this side: {exc}") from exc
    value: Any = found
    for name in names:
        namespace = vars(value) if isinstance(value, (types.ModuleType, type)) else None
        if namespace is None or name not in namespace:
            raise Unresolvable(f"{module}.{qualname} does not exist on this side")
        value = namespace[name]
    if not isinstance(value, type):
        raise Refused(f"{module}.{qualname}, which is not a class")
    _RESOLVED[key] = value
    return value


_ALLOWED: dict[tuple[Any, Any, Any, str], type] = {}


def _checked(module: Any, qualname: Any, tracker: Any, kind: str, test: Any) -> Any:
    key = (module, qualname, tracker, kind)
    cls = _ALLOWED.get(key)
    if cls is not None:
        return cls
    cls = _resolve(module, qualname, tracker)
    if not test(cls):
        raise Refused(f"{_class_name(cls)}, which is not {kind}")
    problem = _stack_method_problem(cls)
    if problem:
        raise Refused(problem)
    if tracker is None:
        _ALLOWED[key] = cls
    return cls


def _is_model(cls: type) -> bool:
    return issubclass(cls, BaseModel) and not issubclass(cls, Runnable)


_MODEL = "a pydantic model (and not a runnable)"


_DICT_OR_NONE = (dict, type(None))
_new_object = object.__new__
_set = object.__setattr__


def _model(module: str, qualname: str, tracker: str | None, values: Any, fields_set: Any, extra: Any,
           private: Any) -> Any:
    cls = _ALLOWED.get((module, qualname, tracker, _MODEL)) or _checked(module, qualname, tracker, _MODEL, _is_model)
    if (type(values) is not dict or type(fields_set) is not set or type(extra) not in _DICT_OR_NONE
            or type(private) not in _DICT_OR_NONE):
        raise Refused(f"a malformed state for {_class_name(cls)}")
    obj = _new_object(cls)
    # What pydantic's own BaseModel.__setstate__ does, without its dict look-ups.
    _set(obj, "__pydantic_fields_set__", fields_set)
    _set(obj, "__pydantic_extra__", extra)
    _set(obj, "__pydantic_private__", private)
    _set(obj, "__dict__", values)
    return obj


def _dataclass(module: str, qualname: str, tracker: str | None, state: Any) -> Any:
    cls = _checked(module, qualname, tracker, "a dataclass", dataclasses.is_dataclass)
    if not isinstance(state, dict) or not all(
            isinstance(key, str) and key.isidentifier() and not key.startswith("__") for key in state):
        raise Refused(f"a malformed state for {_class_name(cls)}")
    obj = object.__new__(cls)
    for key, value in state.items():
        object.__setattr__(obj, key, value)
    return obj


def _enum(module: str, qualname: str, tracker: str | None, name: Any, value: Any) -> Any:
    cls = _checked(module, qualname, tracker, "an Enum", lambda c: issubclass(c, enum.Enum))
    members = cls.__members__
    if isinstance(name, str) and name in members:
        return members[name]
    for member in members.values():
        if member.value == value and type(member.value) is type(value):
            return member
    raise Unresolvable(f"{_class_name(cls)} has no member {name!r} here")


def _namedtuple(module: str, qualname: str, tracker: str | None, values: Any) -> Any:
    cls = _checked(module, qualname, tracker, "a namedtuple",
                   lambda c: issubclass(c, tuple) and hasattr(c, "_fields"))
    if not isinstance(values, tuple):
        raise Refused(f"malformed values for {_class_name(cls)}")
    return tuple.__new__(cls, values)


def _builtin_base(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__ == "builtins":
            return base
    return BaseException


def _exception(module: str, qualname: str, tracker: str | None, args: Any, state: Any) -> Any:
    cls = _checked(module, qualname, tracker, "an Exception class", lambda c: issubclass(c, Exception))
    if not isinstance(args, tuple) or not isinstance(state, dict) or not all(
            isinstance(key, str) and key.isidentifier() and (not key.startswith("__") or key == "__notes__")
            for key in state):
        raise Refused(f"a malformed state for {_class_name(cls)}")
    # A built-in exception type runs its own C code (which sets errno, name, ...); any other
    # class gets its built-in base's __new__, so no Python code of the class runs.
    exc = cls(*args) if cls.__module__ == "builtins" else _builtin_base(cls).__new__(cls, *args)
    exc.__dict__.update(state)
    return exc


# The only globals a result may name: the rebuild functions above and value types of the
# standard library whose constructors and __setstate__ only build values.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    (__name__, f.__name__): f for f in (_model, _dataclass, _enum, _namedtuple, _exception)
}
_SAFE_GLOBALS.update({
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("zoneinfo", "ZoneInfo._unpickle"): zoneinfo.ZoneInfo._unpickle,  # type: ignore[attr-defined]
    ("uuid", "UUID"): uuid.UUID,
    ("decimal", "Decimal"): decimal.Decimal,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "deque"): collections.deque,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): collections.defaultdict,
    # defaultdict's factory, and class objects in data (``{"type": int}``). Not bytes or
    # bytearray: ``bytes(2**40)`` is a 20-byte pickle that allocates a terabyte.
    **{("builtins", t.__name__): t for t in (list, dict, set, frozenset, tuple, int, float, str, bool)},
})
_SAFE_GLOBAL_IDS = {id(value) for value in _SAFE_GLOBALS.values()}
# Instances the C pickler writes by itself (NotImplemented from reducer_override).
_PLAIN_TYPES = frozenset({
    dict, list, tuple, set, frozenset, bytearray, complex, datetime.datetime, datetime.date,
    datetime.time, datetime.timedelta, datetime.timezone, zoneinfo.ZoneInfo, uuid.UUID,
    decimal.Decimal, collections.OrderedDict, collections.deque, collections.Counter,
    collections.defaultdict,
})


class _ResultPickler(pickle.Pickler):
    """Writes a result as data, or raises :class:`Refused` naming what is not data."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _PLAIN_TYPES:
            return NotImplemented
        if id(obj) in _SAFE_GLOBAL_IDS:
            return NotImplemented  # a rebuild function or a safe class, written by name
        if isinstance(obj, type):
            raise Refused(f"the class {_class_name(obj)} (a class is code, not data)")
        if isinstance(obj, BaseModel):
            if isinstance(obj, Runnable):
                raise Refused(f"a runnable ({_class_name(cls)})")
            self._check(cls)
            state = BaseModel.__getstate__(obj)
            return _model, (*_class_ref(cls), state["__dict__"], state["__pydantic_fields_set__"],
                            state["__pydantic_extra__"], state["__pydantic_private__"])
        if isinstance(obj, enum.Enum):
            self._check(cls)
            return _enum, (*_class_ref(cls), obj.name, obj.value)
        if isinstance(obj, BaseException):
            if not isinstance(obj, Exception):
                raise Refused(f"{_class_name(cls)}, which is not an Exception")
            self._check(cls)
            return _exception, (*_class_ref(cls), obj.args, _exception_state(obj))
        if dataclasses.is_dataclass(obj):
            self._check(cls)
            state = dict(vars(obj)) if hasattr(obj, "__dict__") else {
                f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return _dataclass, (*_class_ref(cls), state)
        if isinstance(obj, tuple) and hasattr(cls, "_fields"):
            self._check(cls)
            return _namedtuple, (*_class_ref(cls), tuple(obj))
        for base in (str, int, float):  # LangChain's TextAccessor, numpy.float64: as the plain value
            if isinstance(obj, base):
                return base, (base(obj),)
        if callable(obj) and hasattr(obj, "__qualname__"):
            raise Refused(f"the function {getattr(obj, '__module__', None)}.{obj.__qualname__} (code, not data)")
        raise Refused(f"an object of type {_class_name(cls)}")

    @staticmethod
    def _check(cls: type) -> None:
        problem = _stack_method_problem(cls)
        if problem:
            raise Refused(problem)


def _exception_state(exc: BaseException) -> dict[str, Any]:
    """The exception's attributes that are data; the others (an HTTP response object) are left out."""
    state = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        if not isinstance(key, str) or not key.isidentifier() or (key.startswith("__") and key != "__notes__"):
            continue
        try:
            _ResultPickler(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        except Exception:  # noqa: BLE001 - not data: this attribute stays on the worker
            continue
        state[key] = value
    return state


def dumps_result(obj: Any) -> bytes:
    """Encode an output, a chunk or an exception as data; raises :class:`Refused` (a CodecError)
    saying what is not data and what to return instead."""
    buffer = io.BytesIO()
    try:
        _ResultPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Refused as exc:
        raise Refused(f"cannot send {type(obj).__name__} back as data: it contains {exc}. {REFUSAL_ADVICE}") from exc
    except RecursionError as exc:
        raise Refused(f"cannot send {type(obj).__name__} back as data: it is nested too deeply or "
                      f"refers to itself. {REFUSAL_ADVICE}") from exc
    except Exception as exc:
        raise Refused(f"cannot send {type(obj).__name__} back as data: {type(exc).__name__}: {exc}. "
                      f"{REFUSAL_ADVICE}") from exc
    return buffer.getvalue()


class _ResultUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise Refused(f"{module}.{name}, which is not data")
        return found


def loads_result(data: bytes) -> Any:
    """Decode :func:`dumps_result`'s bytes without running code chosen by the sender.

    Raises :class:`Refused` naming the refused global or class (nothing was run), or
    :class:`Unresolvable` / :class:`CodecError` when a class is missing here or the bytes are bad.
    """
    try:
        return _ResultUnpickler(io.BytesIO(data)).load()
    except (Refused, Unresolvable):
        raise
    except Exception as exc:
        raise CodecError(f"the data cannot be decoded: {type(exc).__name__}: {exc}") from exc


def dumps_output(obj: Any, trusted: bool) -> bytes:
    """An output or chunk for the way back: data only, or anything picklable when the client
    trusts its workers."""
    return dumps(obj) if trusted else dumps_result(obj)


def loads_output(data: bytes, trusted: bool) -> Any:
    return loads(data) if trusted else loads_result(data)
