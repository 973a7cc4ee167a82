"""Warm mode: calls go to a broker over the process's shared connection.

Every way of calling (invoke, stream, batch, as completed; sync and async) is one loop over task
events. Whatever ends a call early (its timeout, an exception in the caller such as
KeyboardInterrupt, a consumer closing a stream, a cancelled asyncio task) reaches a ``finally``
that cancels the task, so the worker stops and its slot is freed.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pool.calls import RemoteCall, decode_output
from pool.client import Connection, Event, LoopSink, Submission, ThreadSink
from pool.errors import TaskTimeout, error_from_wire
from worker import protocol as P

_OK = object()


def _timeout_error(call: RemoteCall) -> TaskTimeout:
    return TaskTimeout(
        f"the call did not finish within its timeout of {call.timeout:g}s and was cancelled on the "
        "worker; raise timeout= on RunnableK8s, or add workers if calls wait in the queue"
    )


class _Tracker:
    """Submitted tasks of one caller and their deadlines."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.open: dict[bytes, tuple[int, RemoteCall, float | None]] = {}

    def submit(self, index: int, call: RemoteCall, kind: str, sink: Any) -> bytes:
        self.connection.check_size(call.runnable, call.input)
        task_id = self.connection.new_task_id()
        header = P.TaskHeader(kind, call.digest, call.timeout, call.retries, call.config).to_bytes()
        deadline = time.monotonic() + call.timeout if call.timeout is not None else None
        self.open[task_id] = (index, call, deadline)
        self.connection.submit(Submission(task_id, header, call.digest, call.runnable, call.input, sink))
        return task_id

    def wait_time(self) -> float | None:
        deadlines = [d for _, _, d in self.open.values() if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def expired(self) -> list[tuple[int, TaskTimeout]]:
        now = time.monotonic()
        gone = [(task_id, i, call) for task_id, (i, call, d) in self.open.items() if d is not None and d <= now]
        for task_id, _, _ in gone:
            self.close(task_id, cancel=True)
        return [(i, _timeout_error(call)) for _, i, call in gone]

    def close(self, task_id: bytes, cancel: bool = False) -> None:
        if self.open.pop(task_id, None) is not None and cancel:
            self.connection.cancel(task_id)

    def cancel_all(self) -> None:
        for task_id in list(self.open):
            self.close(task_id, cancel=True)


def _outcome(event: Event) -> Any:
    """The value of a result event, or the exception of an error event (returned, not raised)."""
    if event.kind == "error":
        return error_from_wire(event.code, event.message, event.data)
    try:
        return decode_output(event.data)
    except Exception as exc:  # noqa: BLE001 - reported like any other failed call
        return exc


class WarmBackend:
    """Runs :class:`RemoteCall` s on a pool through one shared :class:`Connection`."""

    def __init__(self, connection: Connection, connect_timeout: float | None = None) -> None:
        self.connection = connection
        # The caller's own patience: the shared connection may have been made by another caller.
        self.connect_timeout = connect_timeout

    # ------------------------------------------------------------------ sync

    def invoke(self, call: RemoteCall) -> Any:
        # The common case, without as_completed's generator and window.
        self.connection.ensure_ready(self.connect_timeout)
        sink = ThreadSink()
        tracker = _Tracker(self.connection)
        task_id = tracker.submit(0, call, "invoke", sink)
        try:
            while True:
                try:
                    event = sink.get(tracker.wait_time())
                except queue.Empty:
                    tracker.expired()
                    raise _timeout_error(call) from None
                if event.kind != "chunk":
                    break
            tracker.close(task_id)
        finally:
            tracker.cancel_all()
        outcome = _outcome(event)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        for index, outcome in self.as_completed(calls, max_concurrency):
            if isinstance(outcome, BaseException) and not return_exceptions:
                raise outcome  # leaving the generator cancels the rest
            results[index] = outcome
        return results

    def as_completed(self, calls: Sequence[RemoteCall], max_concurrency: int | None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output or exception)`` as each call finishes; at most
        ``max_concurrency`` in flight."""
        self.connection.ensure_ready(self.connect_timeout)
        sink = ThreadSink()
        tracker = _Tracker(self.connection)
        window = max_concurrency or len(calls)
        next_index = 0
        try:
            while next_index < len(calls) or tracker.open:
                while next_index < len(calls) and len(tracker.open) < window:
                    tracker.submit(next_index, calls[next_index], "invoke", sink)
                    next_index += 1
                try:
                    event = sink.get(tracker.wait_time())
                except queue.Empty:
                    yield from tracker.expired()
                    continue
                entry = tracker.open.get(event.task_id)
                if entry is None or event.kind == "chunk":
                    continue
                tracker.close(event.task_id)
                yield entry[0], _outcome(event)
        finally:
            tracker.cancel_all()

    def stream(self, call: RemoteCall) -> Iterator[Any]:
        self.connection.ensure_ready(self.connect_timeout)
        sink = ThreadSink()
        tracker = _Tracker(self.connection)
        task_id = tracker.submit(0, call, "stream", sink)
        try:
            while True:
                try:
                    event = sink.get(tracker.wait_time())
                except queue.Empty:
                    tracker.expired()
                    raise _timeout_error(call) from None
                if event.kind == "chunk":
                    yield decode_output(event.data)
                    continue
                tracker.close(task_id)
                if event.kind == "error":
                    raise error_from_wire(event.code, event.message, event.data)
                return
        finally:
            tracker.cancel_all()

    # ------------------------------------------------------------------ async

    async def _ensure_ready(self) -> None:
        if not self.connection.ready:
            # Only while connecting: a thread waits for the handshake so the loop does not.
            await asyncio.get_running_loop().run_in_executor(None, self.connection.ensure_ready, self.connect_timeout)

    async def ainvoke(self, call: RemoteCall) -> Any:
        # The common case, without aas_completed's async generator and window.
        await self._ensure_ready()
        sink = LoopSink()
        tracker = _Tracker(self.connection)
        task_id = tracker.submit(0, call, "invoke", sink)
        try:
            while True:
                try:
                    event = await sink.get(tracker.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    tracker.expired()
                    raise _timeout_error(call) from None
                if event.kind != "chunk":
                    break
            tracker.close(task_id)
        finally:
            tracker.cancel_all()
        outcome = _outcome(event)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        iterator = self.aas_completed(calls, max_concurrency)
        try:
            async for index, outcome in iterator:
                if isinstance(outcome, BaseException) and not return_exceptions:
                    raise outcome
                results[index] = outcome
        finally:
            await iterator.aclose()
        return results

    async def aas_completed(self, calls: Sequence[RemoteCall],
                            max_concurrency: int | None) -> AsyncIterator[tuple[int, Any]]:
        await self._ensure_ready()
        sink = LoopSink()
        tracker = _Tracker(self.connection)
        window = max_concurrency or len(calls)
        next_index = 0
        try:
            while next_index < len(calls) or tracker.open:
                while next_index < len(calls) and len(tracker.open) < window:
                    tracker.submit(next_index, calls[next_index], "invoke", sink)
                    next_index += 1
                try:
                    event = await sink.get(tracker.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    for item in tracker.expired():
                        yield item
                    continue
                entry = tracker.open.get(event.task_id)
                if entry is None or event.kind == "chunk":
                    continue
                tracker.close(event.task_id)
                yield entry[0], _outcome(event)
        finally:
            tracker.cancel_all()

    async def astream(self, call: RemoteCall) -> AsyncIterator[Any]:
        await self._ensure_ready()
        sink = LoopSink()
        tracker = _Tracker(self.connection)
        task_id = tracker.submit(0, call, "stream", sink)
        try:
            while True:
                try:
                    event = await sink.get(tracker.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    tracker.expired()
                    raise _timeout_error(call) from None
                if event.kind == "chunk":
                    yield decode_output(event.data)
                    continue
                tracker.close(task_id)
                if event.kind == "error":
                    raise error_from_wire(event.code, event.message, event.data)
                return
        finally:
            tracker.cancel_all()
