"""Batching across callers: concurrent ``invoke``/``ainvoke`` calls of one ``RunnableK8s`` sent as one batch.

Opt-in (``RunnableK8s(batch_window_ms=N, max_batch=M)``). A model that batches natively (an
embeddings model: one API request for many texts) pays per request, not per text; callers who each
``invoke`` it with one text pay a request each. The coalescer gathers the calls of one instance
that arrive within ``batch_window_ms`` of the first (or until ``max_batch`` of them), and sends
them as ONE batch task (``WarmBackend.gathered_batch``: not spread over the workers in sub-batches
as a ``batch()`` is), which one worker runs with the runnable's own ``batch_as_completed``. Each caller gets its own
result or its own exception, as if it had called alone (the way Ray Serve's ``@serve.batch`` works).

Why these rules:

* The window starts at the first call of a batch, so no caller waits longer than the window before
  its call leaves; a lone call waits the whole window (the cost of opting in).
* Calls share a batch only when one task can carry them all: the same wire config and the same
  keyword arguments (:func:`batch_key`). Calls something listens to, calls of a thread (an
  affinity) and streams are never gathered; ``RunnableK8s`` sends them as before.
* Sync callers (any thread) share one gatherer; async callers share one per event loop, so a
  future is only ever touched from its own loop. Calls on different loops never share a batch.
* The batch is sent by a thread of a small shared pool (sync) or a task of the loop (async), not
  by one of the callers: a caller that gives up (an interrupted thread, a cancelled task) leaves
  the others' batch alone. Its call is dropped if the batch has not left yet, else its result is
  dropped when it comes.
* A failure of one item reaches its caller only; a failure of the whole batch (a lost worker
  beyond its retries, a pool that does not answer) reaches every caller of that batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import threading
import time
import weakref
from dataclasses import replace
from typing import Any

from pool.client.calls import DEFAULT_WIRE_CONFIG, RemoteCall

__all__ = ["Coalescer", "batch_key", "coalescings_sent"]

#: The most sync batches in flight at once in this process (each holds a thread while it waits
#: for its results); more wait for one of those threads, as calls wait for a slot in the pool.
SENDER_THREADS = 32

_NOTHING = object()


def batch_key(config: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """What calls must share to travel in one batch task (which has one config and one kwargs),
    or None for a call that cannot share one (kwargs that are not JSON: no way to tell them apart)."""
    wired: Any = "default" if config is DEFAULT_WIRE_CONFIG else json.dumps(config, sort_keys=True, default=str)
    if not kwargs:
        return wired
    try:
        return wired, json.dumps(kwargs, sort_keys=True)
    except (TypeError, ValueError):
        return None


class _Counter:
    __slots__ = ("batches", "calls", "lock")

    def __init__(self) -> None:
        self.batches = 0
        self.calls = 0
        self.lock = threading.Lock()  # sender threads count at once

    def add(self, calls: int) -> None:
        with self.lock:
            self.batches += 1
            self.calls += calls


_sent = _Counter()


def coalescings_sent() -> tuple[int, int]:
    """``(batches, calls)`` sent by every coalescer of this process: a seam for tests and benches."""
    return _sent.batches, _sent.calls


class _Slot:
    """One sync caller's place in a batch: its call, and its outcome once known."""

    __slots__ = ("call", "done", "outcome", "abandoned")

    def __init__(self, call: RemoteCall) -> None:
        self.call = call
        self.done = threading.Event()
        self.outcome: Any = _NOTHING
        self.abandoned = False


class _SyncBatch:
    __slots__ = ("key", "slots", "full")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.slots: list[_Slot] = []
        self.full = threading.Event()


class _AsyncBatch:
    __slots__ = ("key", "calls", "futures", "timer")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.calls: list[RemoteCall] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.timer: asyncio.TimerHandle | None = None


class _Senders:
    """The thread pool that sends sync batches, started at first use, shared by every coalescer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.pid = 0

    def get(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.pool is None or self.pid != os.getpid():  # a forked child has none of the threads
            with self.lock:
                if self.pool is None or self.pid != os.getpid():
                    self.pool = concurrent.futures.ThreadPoolExecutor(SENDER_THREADS,
                                                                      thread_name_prefix="rk8s-coalesce")
                    self.pid = os.getpid()
        return self.pool


_senders = _Senders()


def _each(error: BaseException, count: int) -> list[BaseException]:
    """The failure of a whole batch for each of its ``count`` callers: the first gets ``error``,
    each other a copy caused by it. One object raised in many threads (or coroutines) would grow
    one traceback out of all their frames."""
    errors = [error]
    for _ in range(count - 1):
        try:
            twin = copy.copy(error)
        except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared as it is
            twin = error
        if twin is not error:
            twin.__cause__ = error
            twin.__traceback__ = None
        errors.append(twin)
    return errors


def _outcome_of(invoke: Any, call: RemoteCall) -> Any:
    """``invoke(call)``'s output, or its exception as a value (as a batch returns it)."""
    try:
        return invoke(call)
    except Exception as exc:  # noqa: BLE001 - the caller's own error, handed to it
        return exc


def _shared_kwargs(call: RemoteCall, kwargs: dict[str, Any] | None) -> RemoteCall:
    """The call carrying ``kwargs`` (the batch's first call's object): the backend groups a
    batch's calls into one task by that object, and equal kwargs are the condition for sharing."""
    return call if call.kwargs is kwargs else replace(call, kwargs=kwargs)


class _AsyncGatherer:
    """The open batches of one event loop; touched only from that loop."""

    def __init__(self) -> None:
        self.open: dict[Any, _AsyncBatch] = {}
        self.sending: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references


class Coalescer:
    """Gathers one ``RunnableK8s``'s concurrent calls into batches (see the module docstring).

    One per instance. A pickled or copied instance gets a fresh one (open batches belong to this
    process and its threads), and so does a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Any, _SyncBatch] = {}
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncGatherer] = (
            weakref.WeakKeyDictionary())
        self._pid = os.getpid()

    def __reduce__(self) -> tuple[type[Coalescer], tuple[()]]:
        return Coalescer, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Coalescer:
        return Coalescer()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # the parent's open batches (and maybe its held lock) are not ours
            self._lock = threading.Lock()
            self._open = {}
            self._loops = weakref.WeakKeyDictionary()
            self._pid = os.getpid()

    # ------------------------------------------------------------------ sync callers

    def invoke(self, backend: Any, call: RemoteCall, key: Any, window: float, max_batch: int) -> Any:
        """``call``'s output (or its exception raised), sent in a batch with the calls of the same
        ``key`` that arrive within ``window`` seconds of the batch's first."""
        self._check_fork()
        slot = _Slot(call)
        with self._lock:
            batch = self._open.get(key)
            first = batch is None
            if batch is None:
                batch = self._open[key] = _SyncBatch(key)
            else:
                slot.call = _shared_kwargs(call, batch.slots[0].call.kwargs)
            batch.slots.append(slot)
            if len(batch.slots) >= max_batch:
                del self._open[key]  # full: no one else joins it, and it leaves now
                batch.full.set()
        if first:
            deadline = time.monotonic() + window
            try:
                _senders.get().submit(self._send, backend, batch, deadline)
            except RuntimeError:  # the interpreter is shutting its thread pools down: send from here
                self._send(backend, batch, deadline)
        try:
            slot.done.wait()
        except BaseException:
            slot.abandoned = True  # dropped if the batch has not left yet; else its outcome is
            raise
        outcome = slot.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _send(self, backend: Any, batch: _SyncBatch, deadline: float) -> None:
        """On a sender thread: wait out the window (or until the batch is full), then send it."""
        try:
            batch.full.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                if self._open.get(batch.key) is batch:
                    del self._open[batch.key]
            slots = [slot for slot in batch.slots if not slot.abandoned]
            if not slots:
                return
            _sent.add(len(slots))
            try:
                if len(slots) == 1:  # alone after all: the short path of one call, not a batch's bookkeeping
                    outcomes: list[Any] = [_outcome_of(backend.invoke, slots[0].call)]
                else:
                    outcomes = backend.gathered_batch([slot.call for slot in slots])
            except BaseException as exc:  # noqa: BLE001 - the whole batch failed: every caller is told
                outcomes = _each(exc, len(slots))
            for slot, outcome in zip(slots, outcomes, strict=True):
                slot.outcome = outcome
                slot.done.set()
        finally:
            for slot in batch.slots:  # whatever went wrong above, no caller waits for ever
                if not slot.done.is_set():
                    slot.outcome = RuntimeError("the batch this call was gathered into was not sent; call again")
                    slot.done.set()

    # ------------------------------------------------------------------ async callers

    def _gatherer(self, loop: asyncio.AbstractEventLoop) -> _AsyncGatherer:
        gatherer = self._loops.get(loop)
        if gatherer is None:
            with self._lock:
                gatherer = self._loops.get(loop)
                if gatherer is None:
                    gatherer = self._loops[loop] = _AsyncGatherer()
        return gatherer

    async def ainvoke(self, backend: Any, call: RemoteCall, key: Any, window: float, max_batch: int) -> Any:
        """:meth:`invoke` for a coroutine: batches are gathered per event loop."""
        self._check_fork()
        loop = asyncio.get_running_loop()
        gatherer = self._gatherer(loop)
        batch = gatherer.open.get(key)
        if batch is None:
            batch = gatherer.open[key] = _AsyncBatch(key)
            batch.timer = loop.call_later(window, self._asend, gatherer, backend, batch)
        elif batch.calls:
            call = _shared_kwargs(call, batch.calls[0].kwargs)
        future: asyncio.Future[Any] = loop.create_future()
        batch.calls.append(call)
        batch.futures.append(future)
        if len(batch.calls) >= max_batch:
            if batch.timer is not None:
                batch.timer.cancel()
            self._asend(gatherer, backend, batch)
        return await future  # cancelling this caller cancels its future only

    def _asend(self, gatherer: _AsyncGatherer, backend: Any, batch: _AsyncBatch) -> None:
        if gatherer.open.get(batch.key) is batch:
            del gatherer.open[batch.key]
        kept = [(call, future) for call, future in zip(batch.calls, batch.futures, strict=True) if not future.done()]
        if not kept:
            return
        task = asyncio.get_running_loop().create_task(_asend(backend, kept))
        gatherer.sending.add(task)
        task.add_done_callback(gatherer.sending.discard)


async def _asend(backend: Any, kept: list[tuple[RemoteCall, asyncio.Future[Any]]]) -> None:
    _sent.add(len(kept))
    try:
        if len(kept) == 1:  # alone after all: the short path of one call
            try:
                outcomes: list[Any] = [await backend.ainvoke(kept[0][0])]
            except Exception as exc:  # noqa: BLE001 - the caller's own error, handed to it
                outcomes = [exc]
        else:
            outcomes = await backend.agathered_batch([call for call, _ in kept])
    except asyncio.CancelledError:
        for _, future in kept:  # the loop is going away: so are its callers
            future.cancel()
        raise
    except BaseException as exc:  # noqa: BLE001 - the whole batch failed: every caller is told
        outcomes = _each(exc, len(kept))
    for (_, future), outcome in zip(kept, outcomes, strict=True):
        if future.done():
            continue  # its caller gave up: the outcome is dropped
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
