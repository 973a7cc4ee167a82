"""Finding a class the data names, on the client: never importing, never calling.

Classes are named, never sent: ``"module:qualname"`` and a tracker id. A class is found only in
a module that is *already imported* here (nothing is ever imported, no ``__main__`` submodule),
by walking module and class namespaces (never an attribute of anything else, never a
descriptor), and it must be of the kind its tag claims (a pydantic model that is not a runnable;
a dataclass; an Enum; a namedtuple; an Exception). A class the client itself sent by value is
found through cloudpickle's tracker, which only knows classes this process pickled.

A class found by name is cached with the path that found it (:class:`Named`) and the cache is
checked against that path on every use (:func:`still_named`: a few dict look-ups), so that a
module reloaded or re-imported, or a class replaced in its module, is found afresh: the cache
never answers with a class the name no longer names.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import cloudpickle
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from worker.result_codec.errors import Refused, Unresolvable
from worker.result_codec.tags import (
    DATACLASS,
    ENUM,
    EXCEPTION,
    MODEL,
    NAMEDTUPLE,
    class_name,
)

_MODULE_DICT: Any = vars(types.ModuleType)["__dict__"].__get__
_CLASS_DICT: Any = vars(type)["__dict__"].__get__


class Named(NamedTuple):
    """How a class was found by name: the module (by its name in ``sys.modules``) and each
    namespace on the way, with the name looked up in it and what was found there."""

    module_name: str
    module: types.ModuleType
    path: tuple[tuple[Mapping[str, Any], str, type], ...]


def still_named(named: Named) -> bool:
    """Whether the name still finds the same class by the same path (the module was not reloaded
    or re-imported, no class on the way was replaced)."""
    if sys.modules.get(named.module_name) is not named.module:
        return False
    for namespace, part, value in named.path:  # noqa: SIM110 - (a loop: all() of a generator is slower)
        if namespace.get(part) is not value:
            return False
    return True


def find_class(name: Any, tracker: Any) -> type:
    """The class named ``name`` ("module:qualname") here: in a module already imported (nothing is
    imported), through module and class namespaces only (no ``getattr``, no descriptor runs)."""
    if tracker is not None:
        if type(tracker) is not str or len(tracker) > 64:
            raise Refused("a class reference with a malformed tracker id")
        known = cloudpickle.cloudpickle._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker)
        if isinstance(known, type):
            return known
    return find_named(name).path[-1][2]


def find_named(name: Any) -> Named:
    """The class named ``name`` ("module:qualname"), with the path that found it (see find_class)."""
    if type(name) is not str or len(name) > 1000 or name.count(":") != 1:
        raise Refused("a class reference that is not a name (module:qualname)")
    module, qualname = name.split(":")
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts) or "__main__" in parts[1:]:
        raise Refused(f"the module name {module!r}")
    names = qualname.split(".")
    if not all(part.isidentifier() and not (part.startswith("__") and part.endswith("__")) for part in names):
        raise Unresolvable(f"{module}.{qualname} is not a class reachable by name (a local class?)")
    found = sys.modules.get(module)
    if not isinstance(found, types.ModuleType):
        raise Unresolvable(f"{module}.{qualname}: module {module} is not imported here; the client imports "
                           "nothing a worker names, so import it in the client before the call")
    namespace = _MODULE_DICT(found)
    path = []
    for part in names:
        value = namespace.get(part) if isinstance(namespace, (dict, types.MappingProxyType)) else None
        if not isinstance(value, type):
            if value is None:
                raise Unresolvable(f"{module}.{qualname} does not exist here")
            raise Refused(f"{module}.{qualname}, which is not a class")
        path.append((namespace, part, value))
        namespace = _CLASS_DICT(value)
    return Named(module, found, tuple(path))


def _is_model(cls: type) -> bool:
    return issubclass(cls, BaseModel) and not issubclass(cls, Runnable)


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


_KINDS: dict[int, tuple[str, Callable[[type], bool]]] = {
    MODEL: ("a pydantic model (and not a runnable)", _is_model),
    DATACLASS: ("a dataclass", dataclasses.is_dataclass),
    ENUM: ("an Enum", lambda cls: issubclass(cls, enum.Enum)),
    NAMEDTUPLE: ("a namedtuple", _is_namedtuple),
    EXCEPTION: ("an Exception class", lambda cls: issubclass(cls, Exception)),
}
# Classes found and checked, by (tag, name), with the path that found them (checked on every use).
# Only real classes of the right kind get in, so its size is bounded by the classes this process has.
_CLASSES: dict[tuple[int, str], Named] = {}


def resolve_class(tag: int, name: Any, tracker: Any) -> Any:
    """The class ``name`` or ``tracker`` refers to, checked to be of the kind ``tag`` claims."""
    if tracker is None:
        return resolve_named(tag, name).path[-1][2]
    cls = find_class(name, tracker)
    _check_kind(tag, cls)
    return cls


def resolve_named(tag: int, name: Any) -> Named:
    """The class named ``name`` with the path that found it, checked to be of the kind ``tag``
    claims; cached, and the cache checked (``still_named``) on every use."""
    cached = _CLASSES.get((tag, name))
    if cached is not None and still_named(cached):
        return cached
    named = find_named(name)
    _check_kind(tag, named.path[-1][2])
    _CLASSES[(tag, name)] = named
    return named


def _check_kind(tag: int, cls: type) -> None:
    kind, test = _KINDS[tag]
    if not test(cls):
        raise Refused(f"{class_name(cls)}, which is not {kind}")
