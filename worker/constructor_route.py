"""Pydantic integrations on the way out: carried as their class path and the constructor
arguments the user set, rebuilt on the worker by their own constructor, secrets left out.

An ``OpenAIEmbeddings`` is a pydantic model whose *arguments* are plain data (a model name, a base
URL, a key) but whose *built state* is not: the constructor makes an ``openai`` client holding an
``httpx`` client, connection pools and locks, so cloudpickle fails ("cannot pickle
'_thread.RLock' object"), and if it did not, the key would travel in the clear. LangChain's
``dumpd`` does not help: an ``Embeddings`` is not LangChain-serializable. Most embeddings,
retrievers and vector-store clients are built the same way. So such an object travels as
``rebuild_by_constructor(class, arguments, secrets)``: the class by reference (module and name),
the fields in ``model_fields_set`` under the name the constructor accepts (its alias unless the
model populates by name), never a field the class marks ``exclude=True`` (its built state: a
``client``, an ``async_client``), never a secret (a ``SecretStr``/``SecretBytes`` field or one in
``lc_secrets``): the worker reads each secret from its own environment, as LangChain's ``load``
does for a ``ChatOpenAI``, and calls the class. Field values go through the same pickler, so an
object inside another (an ``InMemoryVectorStore``'s embedding, a retriever's vector store) takes
the route it needs at any depth.

Which objects take it (``worker.outbound`` asks :func:`wants_constructor`):

* every pydantic ``Embeddings``: an embedding depends only on its settings, and its built state
  (clients, tokenizers, caches) is the worker's to build; one route whatever the client happens
  to have built keeps the bytes, hence the digest workers cache by, the same;
* any pydantic model holding a secret that cannot take the ``dumpd`` route: by value it would
  copy the secret into the bytes;
* any other pydantic model only when it does not pickle by value (``worker.outbound`` tries the
  cheap route first): a model that pickles keeps every field, including a default the user mutated
  after construction, which a constructor would lose.

What this cannot know: a validator that assigns a field (``self.x = ...``) puts it in
``model_fields_set`` as if the user had set it, so it travels (harmless for data: the constructor
takes it back). A field holding a live client that the class does not mark ``exclude=True``
(``http_client``) is refused, naming the field, whether the user or a validator set it.

Trust (docs/design.md#trust-one-pool-is-one-trust-domain): the worker imports the named module and
calls the class, which a pickle can already make it do; :func:`rebuild_by_constructor` only
accepts pydantic model classes, found by walking a module's namespace, so it adds no power.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import cloudpickle
from langchain_core.embeddings import Embeddings
from langchain_core.load.serializable import Serializable
from pydantic import AliasChoices, BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo

from worker.result_codec.errors import CodecError

#: Fields holding a client by LangChain's naming; one the user set travels never: it is refused.
CLIENT_FIELDS = frozenset({"client", "async_client", "http_client", "http_async_client"})
#: The most secrets and environment names one object may ask the worker to read.
_MAX_SECRETS = 32
_MAX_ENV_NAMES = 8
_PLAIN = (str, int, float, bool, bytes, type(None))

# (module, qualname, where it comes from on the client: "langchain-openai 1.8.1" or "")
ClassRef = tuple[str, str, str]
# (constructor keyword, environment variables to read it from, most preferred first)
SecretRef = tuple[str, tuple[str, ...]]


class _Plan:
    """What one class needs, computed once: per field, the constructor keyword, whether it is a
    secret and which environment variables hold it, and whether it is excluded."""

    def __init__(self, cls: type[BaseModel]) -> None:
        config = cls.model_config
        by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
        self.fields: dict[str, FieldInfo] = dict(cls.model_fields)
        self.keys = {name: name if by_name else _alias(name, field) for name, field in self.fields.items()}
        self.secret_fields = frozenset(
            name for name, field in self.fields.items() if _mentions_secret(field.annotation))
        self.env_names = {name: _env_names(self.fields[name]) for name in self.secret_fields}
        self.excluded = frozenset(name for name, field in self.fields.items() if field.exclude is True)


@functools.lru_cache(maxsize=1024)
def _plan(cls: type[BaseModel]) -> _Plan:
    return _Plan(cls)


def _alias(name: str, field: FieldInfo) -> str:
    """The keyword a model that does not populate by name accepts for ``name``."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        first = next((choice for choice in alias.choices if isinstance(choice, str)), None)
        if first is not None:
            return first
    return field.alias if isinstance(field.alias, str) else name


def _mentions_secret(annotation: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(annotation, type) and issubclass(annotation, (SecretStr, SecretBytes)):
        return True
    return any(_mentions_secret(arg, depth + 1) for arg in typing.get_args(annotation))


def _env_names(field: FieldInfo) -> tuple[str, ...]:
    """The environment variables LangChain's ``secret_from_env`` default reads for a field, if that
    is its default (the name is in the factory's closure); otherwise none are known."""
    factory = field.default_factory
    code = getattr(factory, "__code__", None)
    if code is None or not getattr(factory, "__qualname__", "").startswith("secret_from_env."):
        return ()
    cells = dict(zip(code.co_freevars, getattr(factory, "__closure__", None) or (), strict=False))
    cell = cells.get("key")
    try:
        key = cell.cell_contents if cell is not None else None
    except ValueError:  # an empty cell
        return ()
    names = (key,) if isinstance(key, str) else tuple(key) if isinstance(key, (list, tuple)) else ()
    return tuple(name for name in names if isinstance(name, str))[:_MAX_ENV_NAMES]


def _lc_secrets(obj: BaseModel) -> dict[str, str]:
    if not isinstance(obj, Serializable):
        return {}
    try:
        secrets = obj.lc_secrets
    except Exception:  # noqa: BLE001 - a broken property declares nothing we can honour
        return {}
    return {k: v for k, v in secrets.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(
        secrets, dict) else {}


def holds_secret(obj: BaseModel) -> bool:
    """Whether ``obj`` has a secret field with a value (set by the user or read from the client's
    environment by a default): by value, it would travel in the clear."""
    plan = _plan(type(obj))
    values = obj.__dict__
    if any(values.get(name) is not None for name in plan.secret_fields):
        return True
    return any(values.get(name) is not None for name in _lc_secrets(obj))


def wants_constructor(obj: BaseModel) -> bool:
    """Whether ``obj`` must take this route whether or not it pickles (see the module's docstring)."""
    return isinstance(obj, Embeddings) or holds_secret(obj)


# Per class: whether its instances may need the constructor route (an Embeddings, or secret fields).
# The data pickler asks for every model it meets, so the answer is one dict look-up after the first.
_MAY_NEED: dict[type, bool] = {}
_MAX_CLASSES_REMEMBERED = 4096


def may_need_constructor(cls: type) -> bool:
    """Whether instances of ``cls`` can ever take the route by :func:`wants_constructor` (cheap)."""
    known = _MAY_NEED.get(cls)
    if known is None:
        known = issubclass(cls, BaseModel) and (issubclass(cls, Embeddings) or bool(_plan(cls).secret_fields))
        if len(_MAY_NEED) >= _MAX_CLASSES_REMEMBERED:
            _MAY_NEED.clear()  # classes made at run time must not pile up
        _MAY_NEED[cls] = known
    return known


def is_plain(value: Any, depth: int = 0) -> bool:
    """Plain data that surely pickles (no need to try it)."""
    if isinstance(value, _PLAIN):
        return True
    if depth > 4:
        return False
    if type(value) in (list, tuple, set, frozenset):
        return all(is_plain(item, depth + 1) for item in value)
    if type(value) is dict:
        return all(isinstance(k, str) and is_plain(v, depth + 1) for k, v in value.items())
    return False


def constructor_reduction(obj: BaseModel, can_send: Callable[[Any], bool]) -> tuple[Any, tuple[Any, ...]]:
    """``(rebuild_by_constructor, args)`` for pickle's ``reducer_override``; raises
    :class:`CodecError` naming the field when a field the user set cannot travel."""
    cls = type(obj)
    plan = _plan(cls)
    name = cls.__qualname__
    lc_secrets = _lc_secrets(obj)
    values = obj.__dict__
    extra = obj.__pydantic_extra__ or {}
    kwargs: dict[str, Any] = {}
    secrets: list[SecretRef] = []
    for field in sorted(obj.model_fields_set):
        if field in plan.excluded:
            continue  # built state by the class's own mark: the worker's constructor builds its own
        key = plan.keys.get(field, field)
        value = values[field] if field in values else extra.get(field)
        if field in plan.secret_fields or field in lc_secrets:
            if value is None:
                continue
            if callable(value) and not isinstance(value, (SecretStr, SecretBytes)):
                raise CodecError(
                    f"{name}.{field} is a function that returns a secret; it cannot be sent (it would "
                    f"run on the worker, or carry the secret with it). Leave {field} unset and give the "
                    f"worker the secret in its environment{_env_hint(plan.env_names.get(field, ()))}.")
            envs = plan.env_names.get(field, ()) or ((lc_secrets[field],) if field in lc_secrets else ())
            secrets.append((key, envs))
            continue
        if value is None:
            kwargs[key] = None
            continue
        if field in CLIENT_FIELDS:
            raise CodecError(_live_field_message(name, field, value))
        if not is_plain(value) and not can_send(value):
            raise CodecError(_live_field_message(name, field, value))
        kwargs[key] = value
    # Secrets not set on this object but read from the client's environment by a default: left
    # out too, so the worker's default reads the worker's environment.
    return rebuild_by_constructor, (class_ref(cls), kwargs, tuple(secrets))


def _env_hint(envs: tuple[str, ...]) -> str:
    return f" ({' or '.join(envs)})" if envs else ""


def _live_field_message(name: str, field: str, value: Any) -> str:
    kind = type(value)
    what = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return (
        f"{name}.{field} holds a {what}, which cannot be sent to a worker (built state such as a client, a "
        f"connection or a lock belongs to the process that made it). {name} travels by its constructor "
        f"arguments: leave {field} unset so that the worker's {name} builds its own, or build the {name} "
        "inside a function that runs on the worker."
    )


# ---------------------------------------------------------------------------- the class, by name


def class_ref(cls: type) -> ClassRef | type:
    """The class by name when the worker can import it (with the distribution it comes from here,
    for the error message), else the class itself (cloudpickle carries a local class by value)."""
    module, qualname = cls.__module__, cls.__qualname__
    by_value = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())
    if (module in ("__main__", "__mp_main__") or "<locals>" in qualname
            or any(module == m or module.startswith(m + ".") for m in by_value)
            or _find_class(sys.modules.get(module), qualname) is not cls):
        return cls
    return module, qualname, _distribution(module.split(".", 1)[0])


@functools.lru_cache(maxsize=256)
def _distribution(top_module: str) -> str:
    """``"langchain-openai 1.8.1"``: what to install on a worker that lacks ``top_module``, when the
    distribution is named like its module (most are). Asked by name, one look-up of a few ms: mapping
    every installed distribution's modules (``packages_distributions``) costs 170 ms."""
    for name in dict.fromkeys((top_module.replace("_", "-"), top_module)):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except Exception:  # noqa: BLE001 - only a hint for an error message
            continue
    return ""


def _find_class(module: Any, qualname: str) -> Any:
    """``module``'s class at ``qualname``, read from namespaces (no module ``__getattr__``)."""
    if not isinstance(module, types.ModuleType):
        return None
    target: Any = module
    for part in qualname.split("."):
        namespace = vars(target) if isinstance(target, (types.ModuleType, type)) else None
        if namespace is None or part not in namespace:
            return None
        target = namespace[part]
    return target


def _resolve_class(ref: Any) -> type[BaseModel]:
    if isinstance(ref, type):
        cls: Any = ref
        label = ref.__qualname__
    else:
        if not (type(ref) is tuple and len(ref) == 3 and all(type(part) is str for part in ref)):
            raise CodecError("a malformed class reference in a constructor call (expected module, name, source)")
        module_name, qualname, source = ref
        label = f"{module_name}.{qualname}"
        if not all(part.isidentifier() for part in module_name.split(".") + qualname.split(".")):
            raise CodecError(f"{label!r} is not a class name: refused")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            install = f"`pip install {source.replace(' ', '==')}`" if source else (
                f"the package that provides the module {module_name.split('.', 1)[0]}")
            raise CodecError(
                f"{label} cannot be rebuilt on this worker: its module {module_name} cannot be imported here "
                f"({type(exc).__name__}: {exc}). Install {install} in the worker image"
                f"{f' (the client has {source})' if source else ''}.") from exc
        cls = _find_class(module, qualname)
        if cls is None:
            raise CodecError(f"{label} does not exist on this worker (the client has {source or 'it'}): install "
                             "the same version of its package in the worker image.")
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise CodecError(f"{label} is not a pydantic model here: refused (only pydantic models are rebuilt by "
                         "their constructor)")
    return cls


# ---------------------------------------------------------------------------- the receiving side


def rebuild_by_constructor(ref: Any, kwargs: Any, secrets: Any) -> Any:
    """Runs on the receiving side, called by pickle: the class called with the arguments the client
    set, and each secret read from this process's environment."""
    cls = _resolve_class(ref)
    if type(kwargs) is not dict or not all(type(key) is str for key in kwargs):
        raise CodecError(f"malformed constructor arguments for {cls.__qualname__}")
    if type(secrets) is not tuple or len(secrets) > _MAX_SECRETS:
        raise CodecError(f"malformed secret references for {cls.__qualname__}")
    arguments = dict(kwargs)
    unresolved: list[str] = []
    for secret in secrets:
        if not (type(secret) is tuple and len(secret) == 2 and type(secret[0]) is str and type(secret[1]) is tuple
                and len(secret[1]) <= _MAX_ENV_NAMES and all(type(env) is str for env in secret[1])):
            raise CodecError(f"a malformed secret reference for {cls.__qualname__}")
        key, envs = secret
        found = next((os.environ[env] for env in envs if os.environ.get(env)), None)
        if found is not None:
            arguments[key] = found
        elif envs:
            raise CodecError(
                f"{cls.__qualname__}.{key} is a secret, so the client did not send it: this worker reads it from "
                f"{' or '.join(envs)}, which is not set in its environment. Set it on the workers (on Kubernetes, "
                "the chart's worker.llmSecretName; for a LocalPool, env={...}).")
        else:
            unresolved.append(key)  # the class's own default decides (it may read the environment)
    try:
        return cls(**arguments)
    except Exception as exc:
        hint = (f" The secret field(s) {', '.join(unresolved)} were not sent (secrets never are) and no "
                "environment variable for them is known: give the class its secret through the worker's "
                "environment." if unresolved else "")
        raise CodecError(f"{cls.__qualname__} could not be rebuilt on the worker by its constructor: "
                         f"{type(exc).__name__}: {exc}.{hint}") from exc
