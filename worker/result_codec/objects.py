"""Builders of instances of the client's classes: pydantic models, dataclasses, Enum members,
namedtuples and exceptions.

Objects are made only through documented constructors: pydantic's ``model_construct`` (the values
are already typed: each was decoded by this package; for the commonest classes its own steps,
inlined: see ``build_model``), the dataclass's constructor, ``Enum[name]``, a namedtuple's
``_make``... never by setting attributes on an object that existed before decoding (exceptions:
see ``build_exception``). Those constructors are the classes' own code: only classes of the
claimed kind that the client imported can be named (``classes``).

A model class's shape (its field names, whether ``model_construct`` reduces to setting four
slots, the fields sets met) is read once per class and cached by the class's name, as a streamed
token's class is the same for every token. The cache is checked on every use, in a few dict
look-ups, against what it was read from: the class's own fields and validator (a model rebuilt
has a new validator) and the path that found the class by its name (a module reloaded or
imported again, a class replaced in it). A message whose field list is not the class's own
takes ``model_construct`` with the message's names, which drops the names the class does not
keep, from its values and from its fields set alike.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, NamedTuple

from worker.result_codec.classes import Named, resolve_class, resolve_named
from worker.result_codec.decoding import Decoding, as_dict, as_list, str_keys
from worker.result_codec.errors import CodecError, Unresolvable
from worker.result_codec.tags import (
    DATACLASS,
    ENUM,
    EXCEPTION,
    MODEL,
    NAMEDTUPLE,
    class_name,
)


class _ModelShape(NamedTuple):
    """What decoding needs to know of a model class, read once per class (a tuple: the hot path
    unpacks it at once), and what it was read from, checked on every use."""

    cls: Any
    names: list[str]  # the fields, in the class's order
    fields: str  # the same, as the worker writes them ("a,b,c")
    allowed: frozenset[str]  # what a fields set may name (the fields)
    extra: bool  # model_config extra="allow": values that are not fields are kept
    #: model_construct's steps reduce to setting the four slots of a fresh instance: no field has
    #: an alias (or one equal to its name), there is no post-init (nor private attributes, which
    #: pydantic initialises there) and the model is not a RootModel
    plain: bool
    hashable: bool
    new: Any  # cls.__new__
    fields_sets: dict[int, frozenset[str]]  # by bit mask, as met (at most _MAX_FIELDS_SETS)
    # What the shape was read from, checked on every use: the class's fields and its validator (a
    # model rebuilt, its fields changed, has a new validator); for a class found by name, the
    # path that found it (``classes.Named``: the module in sys.modules, the class in the module's
    # namespace, ``deep`` the steps below for a nested class), so that a module reloaded or a
    # class replaced is found afresh. A class found through cloudpickle's tracker has no path
    # (``module_name`` "", ``module`` None: what sys.modules says of "").
    pydantic_fields: Any
    validator: Any
    own_get: Any  # the class's own namespace's get (faster than the class's attributes: a metaclass)
    module_name: str
    module: Any
    top_get: Any  # the module namespace's get
    top_key: str
    top: Any
    deep: tuple[tuple[Any, str, type], ...]


_MAX_FIELDS_SETS = 256
# Model classes found and checked, with their shapes, by name (see classes._CLASSES), and the
# shapes of classes found through cloudpickle's tracker (which come and go with the code that sent them).
_MODELS: dict[str, _ModelShape] = {}
_TRACKED_SHAPES: weakref.WeakKeyDictionary[type, _ModelShape] = weakref.WeakKeyDictionary()
_object_setattr = object.__setattr__
_CLASS_DICT: Any = vars(type)["__dict__"].__get__
_modules_get = sys.modules.get
_NOWHERE: dict[str, Any] = {}


def _model_shape(name: Any, tracker: Any) -> _ModelShape:
    """The shape of the model class ``name`` (or ``tracker``) names, read afresh unless the one
    cached for that class is still its shape."""
    named: Named | None = None
    cls: Any
    if tracker is None:
        named = resolve_named(MODEL, name)
        cls = named.path[-1][2]
    else:
        cls = resolve_class(MODEL, name, tracker)
        shape = _TRACKED_SHAPES.get(cls)
        if shape is not None and _current(shape):
            return shape
    own_get = _CLASS_DICT(cls).get  # (what _current compares: the class's own, not inherited, values)
    fields = cls.__pydantic_fields__
    plain = not cls.__pydantic_root_model__ and not cls.__pydantic_post_init__ and all(
        field.alias in (None, key) and field.validation_alias in (None, key) for key, field in fields.items())
    if named is not None:
        (namespace, key, top), *deep = named.path
        where: tuple[Any, ...] = (named.module_name, named.module, namespace.get, key, top, tuple(deep))
    else:
        where = ("", None, _NOWHERE.get, "", None, ())
    shape = _ModelShape(cls, list(fields), ",".join(fields), frozenset(fields),
                        cls.model_config.get("extra") == "allow", plain, cls.__hash__ is not None, cls.__new__, {},
                        own_get("__pydantic_fields__"), own_get("__pydantic_validator__"), own_get, *where)
    if tracker is None:
        _MODELS[name] = shape
    else:
        _TRACKED_SHAPES[cls] = shape
    return shape


def _current(shape: _ModelShape) -> bool:
    """Whether ``shape`` is still its class's, and the class still the one its name names."""
    own_get = shape.own_get
    return (own_get("__pydantic_fields__") is shape.pydantic_fields
            and own_get("__pydantic_validator__") is shape.validator
            and _modules_get(shape.module_name) is shape.module and shape.top_get(shape.top_key) is shape.top
            and _deep_current(shape.deep))


def _deep_current(deep: tuple[tuple[Any, str, type], ...]) -> bool:
    for namespace, part, value in deep:  # noqa: SIM110 - (a loop: all() of a generator is slower)
        if namespace.get(part) is not value:
            return False
    return True


def _fields_set(shape: _ModelShape, names: list[str], same: bool, mask: Any) -> set[str]:
    """The names a bit mask over ``names`` selects."""
    if type(mask) is not int or mask < 0 or mask >> len(names):
        raise CodecError(f"a malformed fields set for {class_name(shape.cls)}")
    cached = shape.fields_sets.get(mask) if same else None
    if cached is None:
        cached = frozenset(name for i, name in enumerate(names) if mask >> i & 1)
        if same and len(shape.fields_sets) < _MAX_FIELDS_SETS:
            shape.fields_sets[mask] = cached
    return set(cached)


def build_model(d: Decoding, payload: Any) -> Any:
    if type(payload) is not list or len(payload) != 8:
        raise CodecError("a malformed pydantic model")
    name, tracker, fields, values, mask, set_extra, extra, private = payload
    shape = _MODELS.get(name) if tracker is None else None
    if shape is None:
        shape = _model_shape(name, tracker)
    cls, names, fields_here, allowed, keeps_extra, plain, hashable, new, fields_sets, pydantic_fields, validator, \
        own_get, module_name, module, top_get, top_key, top, deep = shape
    if (own_get("__pydantic_fields__") is not pydantic_fields or own_get("__pydantic_validator__") is not validator
            or _modules_get(module_name) is not module or top_get(top_key) is not top
            or (deep and not _deep_current(deep))):  # (``_current``, inlined: this runs per token)
        shape = _model_shape(name, tracker)
        cls, names, fields_here, allowed, keeps_extra, plain, hashable, new, fields_sets, *_ = shape
    if (plain and fields == fields_here and extra is None and private is None and set_extra is None
            and type(values) is list and len(values) == len(names)):
        cached = fields_sets.get(mask)
        if cached is not None:  # a streamed token's way: the same shape and fields set as the one before
            obj = new(cls)  # (as below, without the branches this case does not take)
            set_slot = _object_setattr
            set_slot(obj, "__dict__", dict(zip(names, values, strict=False)))
            set_slot(obj, "__pydantic_fields_set__", set(cached))
            set_slot(obj, "__pydantic_extra__", {} if keeps_extra else None)
            set_slot(obj, "__pydantic_private__", None)
            return d.hashed(obj) if hashable else obj
    same = fields == fields_here
    if not same:
        names = _field_names(fields, cls)
    if type(values) is not list or len(values) != len(names) or (extra is not None and type(extra) is not dict):
        raise CodecError(f"a malformed state for {class_name(cls)}")
    cached = fields_sets.get(mask) if same else None
    fields_set = set(cached) if cached is not None else _fields_set(shape, names, same, mask)
    if set_extra is not None:
        if type(set_extra) is not list or not extra or not set(set_extra) <= extra.keys():
            raise CodecError(f"a malformed fields set for {class_name(cls)}")
        fields_set.update(set_extra)
    values = dict(zip(names, values, strict=False))  # (of one length: checked above)
    if plain and same and not extra and not private:
        # Exactly what model_construct does for such a class when every field has a value (its
        # loop over the fields, looking each up by alias and by name, is most of its cost): a
        # fresh instance from the class's own __new__, then its four slots.
        obj = new(cls)  # the class's own __new__, as model_construct calls it
        set_slot = _object_setattr
        set_slot(obj, "__dict__", values)
        set_slot(obj, "__pydantic_fields_set__", fields_set)
        set_slot(obj, "__pydantic_extra__", {} if keeps_extra else None)
        set_slot(obj, "__pydantic_private__", None)
    else:
        if extra:
            values = {**str_keys(extra, class_name(cls)), **values}
        if "_fields_set" in values:
            raise CodecError(f"a field named _fields_set in {class_name(cls)}")
        # The fields set names fields, and extra values only for a class that keeps them: names
        # the class drops (another version's fields, or a hostile list) are not set on it.
        obj = cls.model_construct(fields_set & (allowed | values.keys()) if keeps_extra else fields_set & allowed,
                                  **values)
        if private:
            # Private attributes (the data ones the worker sent) of the fresh instance, through
            # pydantic's own assignment, for the names the class declares.
            declared = cls.__private_attributes__
            for key, value in str_keys(private, class_name(cls)).items():
                if key in declared:
                    setattr(obj, key, value)
    return d.hashed(obj) if hashable else obj


def _field_names(fields: Any, cls: type) -> list[str]:
    """The worker's field names, when they are not this class's (another version of it)."""
    if type(fields) is not str:
        raise CodecError(f"malformed field names for {class_name(cls)}")
    names = fields.split(",") if fields else []
    if not all(name.isidentifier() for name in names):
        raise CodecError(f"malformed field names for {class_name(cls)}")
    return names


def build_dataclass(d: Decoding, payload: Any) -> Any:
    name, tracker, values = as_list(payload, "dataclass", 3)
    cls = resolve_class(DATACLASS, name, tracker)
    obj = cls(**str_keys(as_dict(values, class_name(cls)), class_name(cls)))
    return obj if cls.__hash__ is None else d.hashed(obj)


def build_enum(d: Decoding, payload: Any) -> Any:
    name, tracker, member = as_list(payload, "Enum member", 3)
    cls = resolve_class(ENUM, name, tracker)
    if type(member) is not str:
        raise CodecError(f"a malformed member name for {class_name(cls)}")
    try:
        return cls[member]
    except KeyError:
        raise Unresolvable(f"{class_name(cls)} has no member {member[:100]!r} here") from None


def build_namedtuple(d: Decoding, payload: Any) -> Any:
    name, tracker, values = as_list(payload, "namedtuple", 3)
    cls = resolve_class(NAMEDTUPLE, name, tracker)
    return d.hashed(cls._make(as_list(values, class_name(cls))))


def _builtin_base(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__ == "builtins":
            return base
    return BaseException


def build_exception(d: Decoding, payload: Any) -> Any:
    name, tracker, args, state, notes = as_list(payload, "exception", 5)
    cls = resolve_class(EXCEPTION, name, tracker)
    if type(args) is not list or type(state) is not dict or not all(
            type(key) is str and key.isidentifier() and not key.startswith("__") for key in state) or (
            notes is not None and (type(notes) is not list or not all(type(note) is str for note in notes))):
        raise CodecError(f"a malformed state for {class_name(cls)}")
    # A built-in exception type runs its own C code (which sets errno, name...). Any other class
    # gets a FRESH instance from its built-in base's __new__, so no Python code of the class runs
    # (an exception's __init__ often demands arguments that are not data, such as an HTTP
    # response); its data attributes then go into that fresh instance's own __dict__, which
    # nothing else refers to yet (no descriptor or __setattr__ of the class runs either).
    exc = cls(*args) if cls.__module__ == "builtins" else _builtin_base(cls).__new__(cls, *args)
    exc.__dict__.update(state)
    for note in notes or ():
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10
            exc.__dict__.setdefault("__notes__", []).append(note)
    return exc
