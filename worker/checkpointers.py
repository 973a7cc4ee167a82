"""A checkpointer the workers share, so a LangGraph thread outlives the worker that paused it.

A graph compiled with ``InMemorySaver()`` keeps its threads in the memory of the one object that
ran them: on a pool, in one worker (the broker sends every call of a thread there, and answers
``ThreadLost`` once that worker is gone). Name a factory for a store every worker reaches, and the
worker puts that store in place of each loaded graph's own checkpointer:

    RUNNABLE_K8S_CHECKPOINTER=worker.checkpointers:sqlite          # or: python -m worker --checkpointer ...
    RUNNABLE_K8S_CHECKPOINTER_URL=/data/checkpoints.sqlite          # what this factory reads

The user compiles with ``InMemorySaver()`` on the laptop, and the same graph runs against the
shared store on the pool, unchanged. The worker says ``"checkpointer": "shared"`` in its READY, and
the broker may then send a thread's next call to any worker.

The factory is ``package.module:name``, called once when the worker starts, with no arguments,
*on the worker's event loop* (graphs run there, and an async client such as aiosqlite, psycopg's
pool or redis.asyncio must be opened on the loop that uses it). It may return a saver, an
awaitable of one, or a (sync or async) context manager that yields one (``AsyncPostgresSaver.
from_conn_string(url)``): the worker enters it and exits it when it stops. The saver must support
LangGraph's async methods (``aget_tuple``, ``aput``...): the worker checks this once at start by
reading a thread that does not exist, which also proves the store is reachable. A failure there
stops the worker with a message saying what to fix, rather than failing every graph call later.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

log = logging.getLogger("runnable_k8s.worker")

ENV = "RUNNABLE_K8S_CHECKPOINTER"
URL_ENV = "RUNNABLE_K8S_CHECKPOINTER_URL"
# Seconds the factory (and the start-up read) may take: a store that does not answer by then is
# reported as unreachable instead of hanging the worker before it ever registers.
START_TIMEOUT = 60.0
# Seconds closing it may take when the worker leaves: short, because a loop stuck in a task that
# would not stop must not keep a worker past its grace period.
CLOSE_TIMEOUT = 5.0
# What READY says (its "checkpointer" key) when this worker's graphs keep their threads in a shared store.
SHARED = "shared"
# The thread the start-up check reads: one no graph uses.
_PROBE_THREAD = "runnable-k8s-checkpointer-check"

RunOnLoop = Callable[[Coroutine[Any, Any, Any], float], Any]


class CheckpointerError(ValueError):
    """The configured checkpointer could not be imported, built or reached (the worker does not start)."""


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable ``spec`` names (``package.module:factory``, the name may be dotted)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise CheckpointerError(
            f"the checkpointer {spec!r} ({ENV} or --checkpointer) is not an import path: write package.module:factory "
            "(for SQLite: worker.checkpointers:sqlite)")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise CheckpointerError(
            f"the checkpointer {spec!r}: could not import {module_name!r} ({type(exc).__name__}: {exc}); "
            "install the package that provides it in the worker image, or fix the path") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CheckpointerError(
                f"the checkpointer {spec!r}: {module_name} has no {attribute!r}; fix the name") from None
    if not callable(target):
        raise CheckpointerError(
            f"the checkpointer {spec!r}: {attribute} is a {type(target).__name__}, not a factory to call")
    return target


class SharedCheckpointer:
    """The saver a factory built, and what to undo when the worker stops."""

    def __init__(self, spec: str, saver: Any, stack: contextlib.AsyncExitStack) -> None:
        self.spec = spec
        self.saver = saver
        self._stack = stack

    @classmethod
    def start(cls, spec: str, run_on_loop: RunOnLoop) -> SharedCheckpointer:
        """Import ``spec``, build its saver on the worker's loop and read from it once; raises
        CheckpointerError saying what went wrong and what to do."""
        factory = load_factory(spec)
        stack = contextlib.AsyncExitStack()
        try:
            saver = run_on_loop(_build(factory, stack), START_TIMEOUT)
        except CheckpointerError:
            raise
        except TimeoutError:
            raise CheckpointerError(
                f"the checkpointer {spec!r} was not ready within {START_TIMEOUT:g}s; check that its "
                "store is reachable from the worker") from None
        except Exception as exc:
            raise CheckpointerError(
                f"building the checkpointer {spec!r} failed ({type(exc).__name__}: {exc}); fix its "
                f"settings (for worker.checkpointers:sqlite, {URL_ENV}) or unset {ENV}") from exc
        return cls(spec, saver, stack)

    def install(self, runnable: Any) -> int:
        """Put the shared saver in place of the checkpointer of each LangGraph graph in ``runnable``
        (the graph itself, or one bound or composed into a chain) that has one of its own: a graph
        compiled without a checkpointer stays without one, and a subgraph keeps inheriting its
        parent's. Returns how many were replaced."""
        return install(runnable, self.saver)

    def close(self, run_on_loop: RunOnLoop) -> None:
        """Exit what the factory opened (its connection's thread would otherwise keep a process alive)."""
        try:
            run_on_loop(self._stack.aclose(), CLOSE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the worker is leaving; say it and go on
            log.warning("closing the checkpointer %s failed (%s: %s); leaving anyway", self.spec,
                        type(exc).__name__, exc)


async def _build(factory: Callable[[], Any], stack: contextlib.AsyncExitStack) -> Any:
    value = factory()
    if inspect.isawaitable(value):
        value = await value
    if hasattr(value, "__aenter__"):
        value = await stack.enter_async_context(value)
    elif hasattr(value, "__enter__") and not _is_saver(value):
        value = stack.enter_context(value)
    if not _is_saver(value):
        await stack.aclose()
        raise CheckpointerError(
            f"the checkpointer factory returned a {type(value).__name__}, not a LangGraph checkpointer "
            "(a langgraph.checkpoint.base.BaseCheckpointSaver, or a context manager or awaitable giving one)")
    try:
        await value.aget_tuple({"configurable": {"thread_id": _PROBE_THREAD, "checkpoint_ns": ""}})
    except NotImplementedError as exc:
        await stack.aclose()
        raise CheckpointerError(
            f"the checkpointer {type(value).__name__} has no async methods, and graphs run on the worker's "
            "event loop; use its async variant (AsyncSqliteSaver: worker.checkpointers:sqlite, "
            f"AsyncPostgresSaver, AsyncRedisSaver) ({exc})") from None
    except BaseException:
        await stack.aclose()
        raise
    return value


def _is_saver(value: Any) -> bool:
    base = sys.modules.get("langgraph.checkpoint.base")
    return base is not None and isinstance(value, base.BaseCheckpointSaver)


def install(runnable: Any, saver: Any) -> int:
    """See :meth:`SharedCheckpointer.install`."""
    graphs = _graphs_with_own_checkpointer(runnable)
    for graph in graphs:
        graph.checkpointer = saver
    return len(graphs)


def keeps_threads(runnable: Any, shared: Any = None) -> bool:
    """Whether ``runnable`` holds a LangGraph graph whose checkpointer is its own (not ``shared``):
    its threads then live in this object, and dropping it from the worker's cache loses them."""
    return any(graph.checkpointer is not shared for graph in _graphs_with_own_checkpointer(runnable))


def _graphs_with_own_checkpointer(runnable: Any) -> list[Any]:
    pregel = sys.modules.get("langgraph.pregel.main")
    base = sys.modules.get("langgraph.checkpoint.base")
    if pregel is None or base is None:  # nothing loaded ever imported LangGraph: no graph in here
        return []
    from worker.execution import parts

    return [part for part in parts(runnable)
            if isinstance(part, pregel.Pregel) and isinstance(part.checkpointer, base.BaseCheckpointSaver)]


def environment_value(checkpointer: SharedCheckpointer | None) -> dict[str, str]:
    """What a worker adds to its READY: ``{"checkpointer": "shared"}``, or nothing."""
    return {"checkpointer": SHARED} if checkpointer is not None else {}


@contextlib.asynccontextmanager
async def sqlite() -> AsyncIterator[Any]:
    """A factory: LangGraph's ``AsyncSqliteSaver`` on the file ``RUNNABLE_K8S_CHECKPOINTER_URL``
    names (a path), for workers that share a disk (one machine, or a
    ReadWriteMany volume). The connection is opened on the worker's event loop, as
    ``AsyncSqliteSaver`` requires; the file is in WAL mode (set by the saver) and a writer waits up
    to 30 s for another worker's write to finish instead of failing at once.

    The pattern for other stores is the same: read the address from the environment, open the
    async client here, yield the saver (see docs/langchain.md#threads)."""
    import sqlite3

    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    path = sqlite_path(os.environ.get(URL_ENV, ""))
    async with contextlib.AsyncExitStack() as stack:
        try:
            connection = await stack.enter_async_context(aiosqlite.connect(path, timeout=30.0))
            saver = AsyncSqliteSaver(connection)
            await saver.setup()
        except sqlite3.Error as exc:
            raise CheckpointerError(
                f"could not open the SQLite checkpoint file {path} ({URL_ENV}): {exc}; check that its folder "
                "exists and that the worker may write there") from exc
        yield saver


def sqlite_path(url: str) -> str:
    """The file a ``RUNNABLE_K8S_CHECKPOINTER_URL`` names (a path: the name says URL because other
    stores' factories read an address from it)."""
    if not url:
        raise CheckpointerError(
            f"worker.checkpointers:sqlite needs {URL_ENV}: the path of the SQLite file every worker reaches "
            "(e.g. /data/checkpoints.sqlite on a shared volume)")
    if url == ":memory:" or url.startswith("file::memory:"):
        raise CheckpointerError(
            f"{URL_ENV}={url} is a database no other worker can see; name a file on a shared disk")
    return url
