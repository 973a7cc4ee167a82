"""LangChain objects on the way out: carried as their ``dumpd`` representation, so secrets become
references the worker resolves from its own environment.

LangChain's ``dumpd`` carries a ChatOpenAI as data and writes its API key as a *reference* that
the worker resolves from its own environment (``load(..., secrets_from_env=True)``), but it
cannot carry a RunnableLambda; cloudpickle carries the lambda but would copy the key in the clear.
``worker.outbound`` uses this module to replace each LangChain-serializable object whose ``dumpd``
tree is complete by a call to :func:`rebuild_langchain_object`, and to refuse an object that
declares secrets but would have to travel by value.

An object that declares secrets but is not LangChain-serializable at all takes the constructor
route instead (``worker.constructor_route``): its secrets are left out there too.

Fields that LangChain marks ``exclude=True`` (a ``rate_limiter``, a custom ``http_client``,
``callbacks``, ``cache``) do not travel with a LangChain-serialized object; the worker builds its
own defaults.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

from langchain_core.load import load
from langchain_core.load.serializable import Serializable

from worker.result_codec.errors import CodecError

# Which LangChain classes load() may rebuild on a worker. Whoever can submit a task already runs
# arbitrary code there (cloudpickle), so "all" adds no new power; it is named explicitly because
# load()'s default ("core") refuses integrations such as ChatOpenAI. Workers can narrow it.
ALLOWED_OBJECTS_ENV = "RUNNABLE_K8S_ALLOWED_OBJECTS"
DEFAULT_ALLOWED_OBJECTS = "all"
AllowedObjects = Literal["all", "core", "messages"]
_ALLOWED_CHOICES: tuple[AllowedObjects, ...] = ("all", "core", "messages")

# load() is marked beta and warns on every call; one warning per rebuilt model is noise.
warnings.filterwarnings("ignore", message=r"The function `load` is in beta")


def rebuild_langchain_object(data: dict[str, Any]) -> Any:
    """Runs on the receiving side, called by pickle: the inverse of the ``dumpd`` route."""
    return load(data, allowed_objects=_allowed_objects(), secrets_from_env=True)


def _allowed_objects() -> AllowedObjects:
    value = os.environ.get(ALLOWED_OBJECTS_ENV, DEFAULT_ALLOWED_OBJECTS)
    for choice in _ALLOWED_CHOICES:
        if value == choice:
            return choice
    raise CodecError(f"{ALLOWED_OBJECTS_ENV}={value!r} is not one of: {', '.join(_ALLOWED_CHOICES)}")


def is_complete(tree: Any) -> bool:
    """False if any node of a ``dumpd`` tree is ``not_implemented`` (it would not load)."""
    if isinstance(tree, dict):
        if tree.get("type") == "not_implemented":
            return False
        return all(is_complete(value) for value in tree.values())
    if isinstance(tree, list):
        return all(is_complete(value) for value in tree)
    return True


def _incomplete_fields(tree: Any) -> list[str]:
    """The top-level fields of a ``dumpd`` tree that hold a ``not_implemented`` node."""
    if isinstance(tree, dict) and tree.get("type") == "not_implemented":
        kwargs = None
    else:
        kwargs = tree.get("kwargs") if isinstance(tree, dict) else None
    if not isinstance(kwargs, dict):
        return []
    return sorted(str(name) for name, value in kwargs.items() if not is_complete(value))


def declared_secrets(obj: Serializable) -> dict[str, str]:
    try:
        secrets = obj.lc_secrets
    except Exception:  # noqa: BLE001 - a broken property declares nothing we can honour
        return {}
    return secrets if isinstance(secrets, dict) else {}


def secret_by_value_message(obj: Any, tree: Any, secrets: dict[str, str]) -> str:
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


# Pickles name this function, and a worker of any release must find it by that name: it travels
# as ``worker.codec._rebuild_langchain_object`` (which re-exports it), the name it has always had.
rebuild_langchain_object.__module__ = "worker.codec"
rebuild_langchain_object.__qualname__ = "_rebuild_langchain_object"
