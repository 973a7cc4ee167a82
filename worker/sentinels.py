"""Module-level sentinels travel by reference on the way out, so ``is`` checks hold on the worker.

A library's ``MISSING = object()`` is compared with ``is``; pickled by value it comes back as a
new object and every such check fails (a compiled LangGraph graph stops working after one plain
cloudpickle round trip: ``PASSTHROUGH``, ``MISSING``...). So an instance of exactly ``object``
that is a module-level name of an importable module travels as a reference: ``rebuild_sentinel`` with
the names it has (a sentinel is often re-exported; the worker takes the first it can import).
A few module-level singletons of another class that LangGraph also compares with ``is`` are
named in ``_NAMED_SINGLETONS``; nothing else is.

The encoding side never imports anything: it indexes by identity the module-level ``object()``
instances of the modules already in ``sys.modules`` (not ``__main__``, not modules without an
import spec), the first time it meets an exact ``object`` instance, and again, for the modules
imported since, when it meets one it does not know and ``len(sys.modules)`` changed (the first
scan reads every module's namespace once: tens of milliseconds with LangChain and LangGraph
imported; later ones read only the new modules). A runnable with no exact ``object`` instance in
it pays a type test and a look-up in a dict of two per object; data (the C pickler) pays the type
test only (the named singletons live inside graphs, which take the hybrid route). Modules
registered with ``cloudpickle.register_pickle_by_value`` keep travelling by value.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

import cloudpickle

from worker.result_codec.errors import CodecError

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
                    namespace = module_namespace(sys.modules.get(module_name))
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
                namespace = module_namespace(module)
                if namespace is None or namespace.get("__spec__") is None:
                    continue  # not a module, or one that cannot be imported by name
                for attribute, value in list(namespace.items()):
                    if type(value) is object and isinstance(attribute, str):
                        entry = self._objects.setdefault(id(value), (value, []))
                        entry[1].append((module_name, attribute))


def module_namespace(module: Any) -> dict[str, Any] | None:
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
        namespace = module_namespace(sys.modules.get(name[0]))
        alias = namespace is None or namespace.get("__name__") != name[0]
        return alias, name[0].count("."), name[0], name[1]

    return tuple(sorted(usable, key=rank)[:_MAX_SENTINEL_NAMES])


SENTINELS = _SentinelIndex()


def sentinel_reduction(obj: object, named: dict[int, tuple[object, list[tuple[str, str]]]]) -> Any:
    """The reduction of a module-level sentinel (``rebuild_sentinel`` and its names), or None."""
    if type(obj) is object:
        names = SENTINELS.names(obj)
    else:
        entry = named.get(id(obj))
        names = tuple(entry[1]) if entry is not None and entry[0] is obj else None
    return (rebuild_sentinel, names) if names else None


def rebuild_sentinel(*names: Any) -> Any:
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
        namespace = module_namespace(module)
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


# Pickles name this function, and a worker of any release must find it by that name: it travels
# as ``worker.codec._sentinel`` (which re-exports it), the name it has always had.
rebuild_sentinel.__module__, rebuild_sentinel.__qualname__ = "worker.codec", "_sentinel"
