"""What cannot go out to a worker, said so that a user knows what to change.

Two mistakes are common enough to deserve their own answer:

* a runnable whose function holds an open file (``f = open(path); RunnableLambda(lambda x:
  f.read())``). cloudpickle would send a copy of what the file held at that moment, and the
  worker would read stale data, silently. So an open file is refused, with the advice to open it
  inside the function, on the worker.
* an input holding a live object (a lock, a client, a socket). Pickle names only the object's
  type, somewhere in the input; :func:`locate` finds where, so the error says
  ``input["a"]["b"] is a _thread.lock``, with advice for inputs (send data; build the object on
  the worker), not the advice for runnables.

Locating costs one encoding attempt per element on the path to the culprit and its siblings: it
runs only after an encoding failed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel

from worker.result_codec.errors import CodecError

#: How deep :func:`locate` looks, and how many elements of one container it tries.
_MAX_DEPTH = 64
_MAX_CHILDREN = 10_000

INPUT_ADVICE = (
    "An input must be data: send plain values (str, numbers, lists, dicts, pydantic models, "
    "dataclasses, LangChain messages), and build objects that hold live resources (locks, open "
    "files, sockets, clients) on the worker, inside the runnable."
)
RUNNABLE_ADVICE = (
    "Objects that hold live resources (open files, sockets, locks, clients) cannot be sent; create "
    "them inside the runnable instead, or use a LangChain object that supports dumpd() or a pydantic "
    "integration whose constructor builds them (an Embeddings: it travels by its settings)."
)


# The concrete base of every file class (``io.IOBase`` is an ABC over it, whose isinstance costs
# three times more, and the pickler asks once per object it writes).
FILE_BASE: type = io.IOBase.__mro__[1]


class OpenFileRefused(CodecError):
    """An open file is part of what was to be sent (see the module's docstring)."""


def is_open_file(obj: Any) -> bool:
    """Whether ``obj`` is a file of the operating system (not an in-memory ``BytesIO``/``StringIO``,
    which is data, nor the standard streams, which cloudpickle sends as references to the worker's)."""
    if not isinstance(obj, FILE_BASE) or isinstance(obj, (io.BytesIO, io.StringIO)):
        return False
    return obj is not sys.stdout and obj is not sys.stderr


def open_file_message(obj: Any) -> str:
    """Why an open file cannot be sent, and what to write instead."""
    name = getattr(obj, "name", None)
    mode = getattr(obj, "mode", None)
    what = f"the open file {name!r}" if isinstance(name, str) else f"an open {type_name(obj)}"
    if isinstance(mode, str):
        what += f" (mode {mode!r})"
    path = repr(name) if isinstance(name, str) else "PATH"
    return (
        f"{what} is part of it (captured by a function, a default argument or an attribute). Open files "
        "cannot be sent to a worker: the worker would read a copy of what the file held now, or nothing. "
        f"Open the file inside the function, so that it is opened on the worker (`with open({path}) as f: "
        "return f.read()` in its body), and make sure the file exists there (in the worker image or on a "
        "mounted volume)."
    )


def type_name(obj: Any) -> str:
    """``module.Class`` of ``obj`` (``_thread.lock``), the bare name for builtins."""
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _key(key: Any) -> str:
    return json.dumps(key) if isinstance(key, str) else repr(key)


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """The parts of ``obj`` an encoder walks into, each with its path below ``path``: containers and
    the fields of models and dataclasses (the user's data). Any other object is where the search
    stops: "input[1] is a threading.Event" says more than the lock deep inside it."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{path}[{_key(key)}]", value
            yield f"a key of {path}", key
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield f"{path}[{i}]", value
    elif isinstance(obj, (set, frozenset)):
        for value in obj:
            yield f"an element of {path}", value
    elif isinstance(obj, BaseModel):
        for name, value in obj.__dict__.items():
            yield f"{path}.{name}", value
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield f"{path}.{field.name}", getattr(obj, field.name, None)


def locate(obj: Any, path: str, can_send: Callable[[Any], bool]) -> tuple[str, Any]:
    """The path and the value of the innermost part of ``obj`` that ``can_send`` refuses (``obj``
    itself, at ``path``, when none of its parts is refused on its own)."""
    seen: set[int] = set()
    for _ in range(_MAX_DEPTH):
        seen.add(id(obj))
        for count, (child_path, child) in enumerate(_children(obj, path)):
            if count >= _MAX_CHILDREN:
                break
            if id(child) not in seen and not can_send(child):
                obj, path = child, child_path
                break
        else:
            return path, obj
    return path, obj


def input_message(root: str, obj: Any, exc: BaseException, can_send: Callable[[Any], bool]) -> str:
    """Which part of an input (``root``: "input", "inputs", "kwargs") cannot be sent, its type,
    why, and what to send instead."""
    path, culprit = locate(obj, root, can_send)
    if is_open_file(culprit):
        name = getattr(culprit, "name", None)
        return (f"{path} is an open file{f' ({name!r})' if isinstance(name, str) else ''}, which cannot be sent to "
                "a worker: send its contents (read them first) or its path, and open it on the worker. "
                f"{INPUT_ADVICE}")
    reason = str(exc).strip() or type(exc).__name__
    return f"{path} is a {type_name(culprit)}, which cannot be serialized ({reason}). {INPUT_ADVICE}"
