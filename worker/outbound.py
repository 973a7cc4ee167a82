"""The way out, client to worker: runnables and inputs, as one cloudpickle pickler that also
carries LangChain objects as data and pydantic integrations by their constructor
(docs/design.md#serialization says why the way back is not this format: see ``worker.result_codec``).

Neither tool alone is enough. cloudpickle carries plain Python code (a lambda with a closure,
a local class) but fails on a ChatOpenAI, which holds live HTTP clients and locks, and it would
carry an API key in the clear. LangChain's ``dumpd`` carries a ChatOpenAI as data with its key as
a reference, but it cannot carry a RunnableLambda. So one cloudpickle pickler does both: each
LangChain-serializable object whose ``dumpd`` tree is complete is replaced, at any depth, by a
call that rebuilds it on the receiving side (``worker.langchain_route``); a pydantic integration
that is not LangChain-serializable (an ``OpenAIEmbeddings``, a model holding a secret, a model
that does not pickle) by a call to its own constructor with the arguments the user set, secrets
left out (``worker.constructor_route``); a pydantic model's bound method by ``getattr`` on the
model, so that the model takes its route first; module-level sentinels travel by reference
(``worker.sentinels``); everything else is cloudpickled. Plain data takes the C pickler, about
15 times cheaper.

Which pydantic models are rebuilt by their constructor only when they fail to pickle is decided
after a failure (a second try, ``_Trials``): an encoding that succeeds the first time pays nothing.

What to know when using it (docs/langchain.md and docs/security.md repeat this):

* Fields that LangChain marks ``exclude=True`` (a ``rate_limiter``, a custom ``http_client``,
  ``callbacks``, ``cache``) do not travel with a LangChain-serialized object, nor with one rebuilt
  by its constructor; the worker builds its own defaults. A client in a field not so marked is
  refused, naming the field.
* Anything pickled *by value*, such as a key captured in a lambda's closure, travels in the clear
  inside the (CurveZMQ-encrypted) channel. Keep secrets in the worker's environment instead.
* An open file cannot travel (the worker would read a stale copy): open it inside the function.
* An input must be data; an error names the part of it that is not (``input["a"]["b"]``).
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import cloudpickle
from langchain_core.load import dumpd
from langchain_core.load.serializable import Serializable
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from worker.constructor_route import constructor_reduction, may_need_constructor, wants_constructor
from worker.langchain_route import (
    declared_secrets,
    is_complete,
    rebuild_langchain_object,
    secret_by_value_message,
)
from worker.protocol import content_digest
from worker.result_codec.errors import CodecError
from worker.sentinels import SENTINELS, rebuild_sentinel, sentinel_reduction
from worker.unsendable import (
    FILE_BASE,
    RUNNABLE_ADVICE,
    OpenFileRefused,
    input_message,
    is_open_file,
    locate,
    open_file_message,
    type_name,
)


class _HybridPickler(cloudpickle.Pickler):
    """cloudpickle, with LangChain objects as data, pydantic integrations by their constructor and
    sentinels by reference (see the module's docstring).

    ``rescue`` is the second try after a failure: then any pydantic model that does not pickle by
    value (``_Trials`` remembers which, per model, for the whole encoding) takes the constructor route
    too. The first try never pays for that test."""

    def __init__(self, file: io.BytesIO, named: dict[int, tuple[object, list[tuple[str, str]]]],
                 rescue: _Trials | None = None, trying: int | None = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._named = named
        self._rescue = rescue
        self._trying = trying  # the id of the model whose by-value pickling this pickler tries
        self._building: set[int] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, FILE_BASE) and is_open_file(obj):
            # cloudpickle would send a snapshot of the file's contents: stale data on the worker.
            raise OpenFileRefused(open_file_message(obj))
        if type(obj) is object or id(obj) in self._named:
            sentinel = sentinel_reduction(obj, self._named)
            if sentinel is not None:
                return sentinel
        if type(obj) is types.MethodType and isinstance(obj.__self__, BaseModel):
            by_name = _method_by_name(obj)
            if by_name is not None:
                return by_name
        # Classes are never model *instances*; skip them cheaply.
        if isinstance(obj, BaseModel) and not isinstance(obj, type):
            reduction = self._model_reduction(obj)
            if reduction is not None:
                return reduction
        # Falling back to cloudpickle's own reducer (not NotImplemented) keeps closures working.
        return super().reducer_override(obj)

    def _model_reduction(self, obj: BaseModel) -> Any:
        lc_serializable = isinstance(obj, Serializable) and obj.is_lc_serializable()
        tree = None
        if lc_serializable:
            try:
                tree = dumpd(obj)
            except Exception:  # noqa: BLE001 - any failure means: not this route
                tree = None
            if tree is not None and is_complete(tree):
                return rebuild_langchain_object, (tree,)
        secrets = declared_secrets(obj) if isinstance(obj, Serializable) else {}
        if lc_serializable:
            if secrets:
                # No secret by value: cloudpickle would copy the key into the bytes in the clear.
                raise CodecError(secret_by_value_message(obj, tree, secrets))
            return None  # a LangChain-serializable class chose LangChain's route: by value when not it
        if id(obj) == self._trying or id(obj) in self._building:
            return None
        if wants_constructor(obj) or (self._rescue is not None and not self._rescue.pickles(obj, self)):
            return self._constructor(obj)
        return None

    def _constructor(self, obj: BaseModel) -> Any:
        self._building.add(id(obj))
        try:
            return constructor_reduction(obj, self._can_send)
        finally:
            self._building.discard(id(obj))

    def _can_send(self, value: Any) -> bool:
        """Whether a field's value pickles the way this pickler would send it (for errors naming the
        field); nested models are tried as this pickler treats them."""
        try:
            _HybridPickler(io.BytesIO(), self._named, self._rescue).dump(value)
        except Exception:  # noqa: BLE001 - any failure means: this field cannot travel
            return False
        return True


def _method_by_name(method: types.MethodType) -> Any:
    """A model's bound method (``embeddings.embed_documents``) as ``getattr(model, name)``: the model
    is rebuilt first, so a worker that lacks its class says so through the model's own route
    (which names the package to install), and the function is the rebuilt class's own."""
    owner, name = method.__self__, getattr(method.__func__, "__name__", None)
    if not isinstance(name, str) or getattr(type(owner), name, None) is not method.__func__:
        return None
    return getattr, (owner, name)


class _Trials:
    """Which pydantic models pickle by value, tried once each per encoding (the rescue pass)."""

    def __init__(self) -> None:
        self._results: dict[int, tuple[object, bool]] = {}

    def pickles(self, obj: BaseModel, pickler: _HybridPickler) -> bool:
        known = self._results.get(id(obj))
        if known is not None and known[0] is obj:
            return known[1]
        try:
            _HybridPickler(io.BytesIO(), pickler._named, self, trying=id(obj)).dump(obj)
            result = True
        except Exception:  # noqa: BLE001 - any failure: rebuild it by its constructor instead
            result = False
        self._results[id(obj)] = (obj, result)
        return result


class _NeedsHybrid(Exception):
    pass


class _DataPickler(pickle.Pickler):
    """The C pickler, for plain data (inputs, outputs, streamed chunks): about 15x cheaper than
    the hybrid pickler on an ``AIMessageChunk``. It gives up (and the hybrid route is taken) at
    any runnable or any LangChain object that declares secrets, so those keep the ``dumpd`` route
    and secrets stay out of the bytes."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is object:  # module-level object() sentinels (not the named singletons: see above)
            names = SENTINELS.names(obj)
            if names:
                return rebuild_sentinel, names
        if (isinstance(obj, Serializable) and not isinstance(obj, type)
                and (isinstance(obj, Runnable) or obj.lc_secrets)):
            raise _NeedsHybrid
        if may_need_constructor(type(obj)) and wants_constructor(obj):
            raise _NeedsHybrid  # an integration or a secret: the constructor route, never by value
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


def _pickle(obj: Any) -> bytes:
    """``obj``'s bytes, or the pickler's own exception (the first try's, when the rescue fails
    too without saying more)."""
    if not isinstance(obj, Runnable):
        data = _dumps_data(obj)
        if data is not None:
            return data
    named = SENTINELS.named()
    buffer = io.BytesIO()
    try:
        _HybridPickler(buffer, named).dump(obj)
    except CodecError:
        raise
    except Exception as first:  # noqa: BLE001 - re-raised below if the rescue does not help
        # Something does not pickle: a pydantic model holding built state may, rebuilt by its
        # constructor on the worker (worker.constructor_route). Only failures pay for this try.
        buffer = io.BytesIO()
        try:
            _HybridPickler(buffer, named, _Trials()).dump(obj)
        except CodecError:
            raise
        except Exception:  # noqa: BLE001 - the first try's error says what failed
            raise first from None
    return buffer.getvalue()


def _can_send(obj: Any) -> bool:
    try:
        _pickle(obj)
    except Exception:  # noqa: BLE001 - any failure means: this part cannot travel
        return False
    return True


def dumps(obj: Any) -> bytes:
    """Encode any object; raises :class:`CodecError` naming the object that could not travel.

    Runnables always take the hybrid route (their digest names them in worker caches, and their
    secrets must become references); plain data takes the C pickler when it can.
    """
    try:
        return _pickle(obj)
    except CodecError as exc:  # ours: an open file, a secret by value, a sentinel; already says what to do
        raise CodecError(f"cannot serialize {type(obj).__name__}: {exc}") from exc
    except Exception as exc:
        if isinstance(obj, Runnable):
            raise CodecError(f"cannot serialize {type(obj).__name__}: {exc}. {RUNNABLE_ADVICE}") from exc
        # Data: say which part failed (value[0]["a"]["b"] is a _thread.lock), not only its type.
        path, culprit = locate(obj, "value", _can_send)
        raise CodecError(f"cannot serialize {type(obj).__name__}: {path} is a {type_name(culprit)}, which cannot be "
                         f"serialized ({exc}). {RUNNABLE_ADVICE}") from exc


def dumps_input(value: Any, kwargs: dict[str, Any]) -> bytes:
    """The input of one call, ``(value, kwargs)``, as :func:`dumps` writes it; a
    :class:`CodecError` names the part that cannot travel (``input["a"]["b"]``) and says what
    to send instead."""
    return _dumps_call_input(value, kwargs, "input")


def dumps_batch_input(values: list[Any], kwargs: dict[str, Any]) -> bytes:
    """The input of a batch, ``(values, kwargs)``, as :func:`dumps` writes it; errors as
    :func:`dumps_input`'s, with paths such as ``inputs[3]["a"]``."""
    return _dumps_call_input(values, kwargs, "inputs")


def _dumps_call_input(value: Any, kwargs: dict[str, Any], root: str) -> bytes:
    try:
        return _pickle((value, kwargs))
    except Exception as exc:
        culprit_root, culprit = (root, value) if not _can_send(value) else ("kwargs", kwargs)
        raise CodecError(input_message(culprit_root, culprit, exc, _can_send)) from exc


def loads(data: bytes) -> Any:
    """Decode what :func:`dumps` produced; raises :class:`CodecError` if it cannot be rebuilt."""
    try:
        return pickle.loads(data)
    except CodecError as exc:  # ours (a constructor, a sentinel): it already says what to do
        raise CodecError(f"cannot deserialize: {exc}") from exc
    except ModuleNotFoundError as exc:
        raise CodecError(
            f"cannot deserialize: the module {exc.name} cannot be imported here ({exc}). Install the package "
            "that provides it on this side (for a worker: in its image, at the client's version), or, for a "
            "module of your own, ship it with the task: cloudpickle.register_pickle_by_value(module)."
        ) from exc
    except Exception as exc:
        raise CodecError(
            f"cannot deserialize: {type(exc).__name__}: {exc}. Usually a module the object needs "
            "is missing on this side, or a secret it references is not in this environment."
        ) from exc


digest = content_digest  # the content digest naming a runnable (worker.protocol: the broker needs it too)
