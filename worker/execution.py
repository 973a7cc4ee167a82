"""Running one task's runnable, for the warm worker and the one-shot (stdio) worker alike.

Where a runnable runs is chosen per runnable, not per call (docs/design.md#the-warm-path):

* async-only ones (an ``async def`` lambda) can only run on an event loop;
* ones that wait on the network and can await it natively (chat models, LLMs, retrievers,
  embeddings, tools, LangGraph graphs, lambdas given an async twin) run on the warm worker's
  event loop too, where hundreds of calls can wait at once for the cost of a coroutine each
  (:func:`prefers_event_loop`), unless a part can only stream synchronously;
* the rest (sync code) runs on a thread: LangChain's async methods would only hand it to a thread
  anyway, and a sync generator cannot be streamed asynchronously at all.

Entry points, all taking and returning encoded bytes (``codec``):

* :func:`run_invoke` / :func:`iterate_stream`: blocking, for a plain thread or script; an
  async-only runnable is driven on a private event loop.
* :func:`arun_invoke` / :func:`aiterate_stream`: coroutines, for an event loop that is already
  running (the warm worker's loop for async-only runnables).
* :func:`iterate_batch` / :func:`aiterate_batch`: a batch task (``protocol`` kind "batch") run
  with the runnable's own ``batch_as_completed`` / ``abatch_as_completed`` and
  ``return_exceptions=True`` (so a chat model's own concurrency handling applies), yielding each
  item as a packed CHUNK frame (``protocol.pack_item`` / ``pack_item_error``) as it finishes. An
  item that raised, or whose output cannot be encoded or is over the message limit, is that
  item's error; the other items go on.

One trace per call (docs/langchain.md#tracing): a task whose caller relays callbacks (its config
carries an ``EventRecorder``, :func:`relays_callbacks`) runs with the worker's own LangSmith
tracing off, whatever the worker's environment says. The relay already puts the worker's runs
under the caller's run, in the caller's trace; a tracer on the worker too would post the same runs
again as a root trace of their own. Every entry point applies it (sync, async, stream, batch), in
the context the runnable runs in: :func:`untraced_context` for code run on a thread (each step
of a stream or batch runs in it, so nothing is left switched off in the thread between steps),
``_tracing_off`` inside a coroutine (an event-loop task has a context of its own). A task
nobody listens to at the caller is traced as the worker's environment says: one root, in the
worker's project, which is the operator's choice and no duplicate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator, RunnableLambda

from worker import codec
from worker import protocol as P
from worker.callback_events import EventRecorder, TokenEventRecorder
from worker.protocol import WIRE_CONFIG_KEYS


class StageError(Exception):
    """A task failed outside the runnable: decoding its input or encoding its output."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause


class OutputTooLarge(Exception):
    """An output or chunk over the broker's message limit: the caller gets PayloadTooLarge."""


def failure(exc: BaseException, trusted: bool = False) -> tuple[bytes, str, bytes]:
    """``(code, message, detail)`` of the ERROR reply for a task that raised ``exc``: one mapping
    for the warm worker and the one-shot worker, so a caller sees the same error in both modes.
    The exception travels as data unless the client ``trusted`` its workers
    (docs/design.md#trust-one-pool-is-one-trust-domain)."""
    if isinstance(exc, OutputTooLarge):
        return P.E_PAYLOAD_TOO_LARGE, str(exc), b""
    if isinstance(exc, StageError):
        return P.E_SERIALIZATION, str(exc), b""
    return P.E_REMOTE, f"{type(exc).__name__}: {exc}", codec.dump_exception(exc, trusted)


def parts(runnable: Any) -> Iterator[Runnable]:
    """``runnable`` and every runnable inside it (steps, branches, bound runnables, fallbacks),
    each once, found through the objects' fields as LangChain composes them."""
    seen: set[int] = set()
    stack = [runnable]
    while stack:
        value = stack.pop()
        if isinstance(value, Runnable):
            if id(value) in seen:
                continue
            seen.add(id(value))
            yield value
            stack.extend(getattr(value, "__dict__", {}).values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())


def _async_only(part: Runnable) -> bool:
    if isinstance(part, RunnableLambda):
        return not hasattr(part, "func")
    if isinstance(part, RunnableGenerator):
        return not hasattr(part, "_transform")
    return False


def is_async_only(runnable: Any) -> bool:
    """True if some part of ``runnable`` can only run asynchronously (an ``async def`` lambda)."""
    return any(_async_only(part) for part in parts(runnable))


# Where LangChain keeps the kinds of objects that wait on the network and await it natively.
# Matched by the class's modules rather than by isinstance so that deciding costs no import.
_AWAITING_MODULES = ("langchain_core.language_models", "langchain_core.retrievers", "langchain_core.embeddings",
                     "langchain_core.tools", "langchain_core.vectorstores", "langgraph.")


def _awaits_natively(part: Runnable) -> bool:
    if isinstance(part, RunnableLambda):
        return hasattr(part, "afunc")  # an async def, or a sync func given its async twin
    if isinstance(part, RunnableGenerator):
        return hasattr(part, "_atransform")
    return any(cls.__module__.startswith(_AWAITING_MODULES) for cls in type(part).__mro__)


def prefers_event_loop(runnable: Any) -> bool:
    """True if ``runnable`` should run on an event loop: it has a part that can only run there,
    or a part that waits on the network and awaits it natively, and no part that can only
    stream synchronously (a sync generator, which ``astream`` refuses)."""
    found = list(parts(runnable))
    if any(_async_only(part) for part in found):
        return True
    if any(isinstance(part, RunnableGenerator) and not hasattr(part, "_atransform") for part in found):
        return False
    return any(_awaits_natively(part) for part in found)


# ---------------------------------------------------------------------- the worker's own tracing


def relays_callbacks(config: RunnableConfig) -> bool:
    """True if the task's callbacks go back to its caller (:func:`task_config` gave it a recorder):
    then its runs reach the caller's tracer through the relay, and the worker must not trace it."""
    callbacks = config.get("callbacks")
    return isinstance(callbacks, list) and any(isinstance(handler, EventRecorder) for handler in callbacks)


class _Quiet:
    """What LangSmith's ``tracing_context(enabled=False)`` sets, as (context variable, value) pairs,
    taken once by running it in an empty context. Setting those pairs is what that context manager
    does on a worker thread (no parent run there), for a fraction of its cost (about 1 us per task
    instead of 16), and it needs no private LangSmith name: whatever variables ``_configure`` and
    ``@traceable`` read to decide, this switches exactly those."""

    values: list[tuple[contextvars.ContextVar[Any], Any]] | None = None

    @classmethod
    def pairs(cls) -> list[tuple[contextvars.ContextVar[Any], Any]]:
        if cls.values is None:
            from langsmith.run_helpers import tracing_context  # a dependency of langchain-core

            def taken() -> list[tuple[contextvars.ContextVar[Any], Any]]:
                with tracing_context(enabled=False):
                    return list(contextvars.copy_context().items())

            cls.values = contextvars.Context().run(taken)
        return cls.values


def _set_all(pairs: list[tuple[contextvars.ContextVar[Any], Any]]) -> None:
    for var, value in pairs:
        var.set(value)


def untraced_context() -> contextvars.Context:
    """A copy of the current context with LangSmith tracing off, to run a task's runnable in."""
    context = contextvars.copy_context()
    context.run(_set_all, _Quiet.pairs())
    return context


class _tracing_off:  # noqa: N801 - used as a context manager, named like one
    """LangSmith tracing off for the block if the task relays callbacks, for a coroutine (whose
    task has a context of its own). Restored at the end; a generator finalized from another
    context (garbage-collected) has nothing to restore there. A class rather than a
    ``contextmanager`` generator: this runs once per task."""

    __slots__ = ("_config", "_tokens")

    def __init__(self, config: RunnableConfig) -> None:
        self._config = config
        self._tokens: list[contextvars.Token[Any]] = []

    def __enter__(self) -> None:
        if relays_callbacks(self._config):
            self._tokens = [var.set(value) for var, value in _Quiet.pairs()]

    def __exit__(self, *exc_info: object) -> None:
        for token in reversed(self._tokens):
            try:
                token.var.reset(token)
            except ValueError:
                pass


def _stepped(context: contextvars.Context, steps: Generator[bytes, None, None]) -> Generator[bytes, None, None]:
    """``steps`` with each step (and its closing) run in ``context``: the runnable's code always
    runs there, and the thread's own context never holds the change between steps."""
    try:
        while True:
            try:
                step = context.run(next, steps)
            except StopIteration:
                return
            yield step
    finally:
        context.run(steps.close)


def task_config(header: P.TaskHeader, emit_event: Callable[[bytes], None]) -> RunnableConfig:
    """The config a task runs with: the wire's part of the caller's config, plus, when the caller
    listens to callbacks, a recorder that relays them (``worker.callback_events``)."""
    config = config_from_wire(header.config)
    if header.events:
        config["callbacks"] = [(TokenEventRecorder if header.tokens else EventRecorder)(emit_event)]
    return config


def config_from_wire(data: dict[str, Any]) -> RunnableConfig:
    return RunnableConfig(**{key: data[key] for key in WIRE_CONFIG_KEYS if data.get(key) is not None})  # type: ignore[typeddict-item]


def decode_input(blob: bytes) -> tuple[Any, dict[str, Any]]:
    try:
        value, kwargs = codec.loads(blob)
    except Exception as exc:
        raise StageError("the task's input could not be decoded on the worker", exc) from exc
    return value, kwargs


def decode_batch_input(blob: bytes, items: int) -> tuple[list[Any], dict[str, Any]]:
    """``(values, kwargs)`` of a batch task, checked against the header's item count."""
    try:
        values, kwargs = codec.loads(blob)
        if not isinstance(values, list) or not isinstance(kwargs, dict):
            raise TypeError("a batch input is (list of values, dict of kwargs)")
        if len(values) != items:
            raise ValueError(f"the header says {items} items, the input holds {len(values)}")
    except Exception as exc:
        raise StageError("the task's input could not be decoded on the worker", exc) from exc
    return values, kwargs


def pack_outcome(index: int, outcome: Any, trusted: bool, max_bytes: int) -> bytes:
    """One batch item's CHUNK frame: its encoded output, or (an exception, an output that cannot
    be encoded or is over ``max_bytes``) its error, with the same codes as a task's ERROR."""
    if not isinstance(outcome, BaseException):
        try:
            packed = P.pack_item(index, encode_output(outcome, trusted))
            if len(packed) <= max_bytes:
                return packed
            outcome = OutputTooLarge(
                f"the output of batch item {index} is {len(packed)} bytes, over the broker's limit of "
                f"{max_bytes}; return less data or raise the broker's --max-message-bytes")
        except StageError as exc:
            outcome = exc
    packed = P.pack_item_error(index, *failure(outcome, trusted))
    if len(packed) > max_bytes:  # an exception too large to send: its type and message will do
        code, message, _ = failure(outcome, trusted)
        packed = P.pack_item_error(index, code, message[:4096])
    return packed


def encode_output(value: Any, trusted: bool = False) -> bytes:
    """An output or chunk as data; pickled only when the client trusts its workers. What is not
    data is refused here, on the worker, with a message saying what to return instead."""
    try:
        return codec.dumps_output(value, trusted)
    except Exception as exc:
        raise StageError(f"the runnable's output ({type(value).__name__}) could not be sent back", exc) from exc


def chunk_encoder(trusted: bool) -> Callable[[Any], bytes]:
    """:func:`encode_output` for every chunk of one stream, the format chosen once: a streamed
    token then costs one call into the codec, not three."""
    dump = codec.dumps if trusted else codec.dumps_result

    def encode(value: Any) -> bytes:
        try:
            return dump(value)
        except Exception as exc:
            raise StageError(f"the runnable's output ({type(value).__name__}) could not be sent back", exc) from exc

    return encode


# ---------------------------------------------------------------------- blocking


def run_invoke(runnable: Runnable, async_only: bool, input_blob: bytes, config: RunnableConfig,
               trusted: bool = False) -> bytes:
    """``runnable.invoke`` (``ainvoke`` on a private loop if async-only); the encoded output."""
    if async_only:
        return asyncio.run(arun_invoke(runnable, input_blob, config, trusted))
    value, kwargs = decode_input(input_blob)
    if relays_callbacks(config):
        return encode_output(untraced_context().run(runnable.invoke, value, config, **kwargs), trusted)
    return encode_output(runnable.invoke(value, config, **kwargs), trusted)


def iterate_stream(runnable: Runnable, async_only: bool, input_blob: bytes,
                   config: RunnableConfig, trusted: bool = False) -> Generator[bytes, None, None]:
    """Each encoded chunk as soon as the runnable yields it. Closing this iterator (or stopping
    between chunks) closes the runnable's stream."""
    chunks = _iterate_stream(runnable, async_only, input_blob, config, trusted)
    return _stepped(untraced_context(), chunks) if relays_callbacks(config) else chunks


def _iterate_stream(runnable: Runnable, async_only: bool, input_blob: bytes,
                    config: RunnableConfig, trusted: bool) -> Generator[bytes, None, None]:
    if async_only:
        yield from _drive(aiterate_stream(runnable, input_blob, config, trusted))
        return
    value, kwargs = decode_input(input_blob)
    chunks = runnable.stream(value, config, **kwargs)
    encode = chunk_encoder(trusted)
    try:
        for chunk in chunks:
            yield encode(chunk)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def iterate_batch(runnable: Runnable, async_only: bool, input_blob: bytes, config: RunnableConfig,
                  items: int, trusted: bool, max_bytes: int,
                  threads: concurrent.futures.Executor | None = None) -> Generator[bytes, None, None]:
    """Each packed item as it finishes (``batch_as_completed``); closing this iterator between
    items stops handing out new ones (items already running finish on their threads).

    ``threads``: a bounded pool that the batch's items run on instead of the thread pool
    LangChain's ``batch_as_completed`` starts per call (see :func:`share_batch_threads`), so that
    a worker's sync code stays within its ``--threads`` however many batches it runs."""
    packed = _iterate_batch(runnable, async_only, input_blob, config, items, trusted, max_bytes, threads)
    return _stepped(untraced_context(), packed) if relays_callbacks(config) else packed


def _iterate_batch(runnable: Runnable, async_only: bool, input_blob: bytes, config: RunnableConfig,
                   items: int, trusted: bool, max_bytes: int,
                   threads: concurrent.futures.Executor | None) -> Generator[bytes, None, None]:
    if async_only:
        yield from _drive(aiterate_batch(runnable, input_blob, config, items, trusted, max_bytes))
        return
    values, kwargs = decode_batch_input(input_blob, items)
    _batch_threads.pool = threads
    outcomes = runnable.batch_as_completed(values, config, return_exceptions=True, **kwargs)
    try:
        for index, outcome in outcomes:
            _batch_threads.pool = None  # the batch has its executor: nested ones get their own
            yield pack_outcome(index, outcome, trusted, max_bytes)
    finally:
        _batch_threads.pool = None
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()


# The pool the batch started on this thread hands its items to (iterate_batch), read once by the
# get_executor_for_config that share_batch_threads installs.
_batch_threads = threading.local()


class _SharedThreads(concurrent.futures.Executor):
    """A batch's view of a shared pool: it copies the context as LangChain's own executor does,
    and leaving the batch does not shut the pool down."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        self._pool = pool

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._pool.submit(functools.partial(contextvars.copy_context().run, fn, *args, **kwargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def share_batch_threads() -> None:
    """Let :func:`iterate_batch` give a batch a shared pool (the warm worker calls this once).

    LangChain's ``Runnable.batch_as_completed`` takes its executor from
    ``langchain_core.runnables.base.get_executor_for_config``, a new thread pool per call, with no
    way to pass one in. This wraps that function in this process: inside ``iterate_batch`` with a
    pool, the batch's first call gets the shared pool; every other call (nested batches, other
    threads, a langchain-core without the function) behaves exactly as before."""
    from langchain_core.runnables import base

    original = getattr(base, "get_executor_for_config", None)
    if original is None or getattr(original, "_rk8s_shared", False):
        return

    @contextlib.contextmanager
    def get_executor_for_config(config: RunnableConfig | None) -> Iterator[concurrent.futures.Executor]:
        pool = getattr(_batch_threads, "pool", None)
        if pool is None:
            with original(config) as executor:
                yield executor
            return
        _batch_threads.pool = None
        yield _SharedThreads(pool)

    get_executor_for_config._rk8s_shared = True  # type: ignore[attr-defined]
    base.get_executor_for_config = get_executor_for_config


def _drive(chunks: AsyncGenerator[bytes, None]) -> Iterator[bytes]:
    """An async iterator as a blocking one, on a private event loop."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(chunks.aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


# ---------------------------------------------------------------------- on a running loop


async def arun_invoke(runnable: Runnable, input_blob: bytes, config: RunnableConfig,
                      trusted: bool = False) -> bytes:
    value, kwargs = decode_input(input_blob)
    with _tracing_off(config):
        output = await runnable.ainvoke(value, config, **kwargs)
    return encode_output(output, trusted)


async def aiterate_stream(runnable: Runnable, input_blob: bytes,
                          config: RunnableConfig, trusted: bool = False) -> AsyncGenerator[bytes, None]:
    value, kwargs = decode_input(input_blob)
    with _tracing_off(config):
        chunks = runnable.astream(value, config, **kwargs)
        encode = chunk_encoder(trusted)
        try:
            async for chunk in chunks:
                yield encode(chunk)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


# The tasks a batch started on the loop (see track_tasks): an async batch runs its items as tasks
# of their own (``asyncio.as_completed``), which closing the batch's iterator does not cancel.
_batch_tasks: contextvars.ContextVar[set[asyncio.Task[Any]] | None] = contextvars.ContextVar(
    "rk8s_batch_tasks", default=None)


def track_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Have ``loop`` note every task created inside :func:`aiterate_batch` (its items' tasks, and
    theirs), so that a batch cancelled, timed out or abandoned cancels its items too."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        context = kwargs.get("context")
        owner = context.get(_batch_tasks) if context is not None else _batch_tasks.get()
        if owner is not None:
            owner.add(task)
        return task

    loop.set_task_factory(factory)


async def aiterate_batch(runnable: Runnable, input_blob: bytes, config: RunnableConfig, items: int,
                         trusted: bool, max_bytes: int) -> AsyncGenerator[bytes, None]:
    values, kwargs = decode_batch_input(input_blob, items)
    with _tracing_off(config):
        started: set[asyncio.Task[Any]] = set()
        token = _batch_tasks.set(started)
        outcomes = runnable.abatch_as_completed(values, config, return_exceptions=True, **kwargs)
        try:
            async for index, outcome in outcomes:
                yield pack_outcome(index, outcome, trusted, max_bytes)
        finally:
            try:
                aclose = getattr(outcomes, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                try:
                    _batch_tasks.reset(token)
                except ValueError:  # finalized from another context (garbage-collected): nothing to undo there
                    pass
                for task in started:
                    task.cancel()  # a no-op for those done
