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
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any

from pool.client.calls import RemoteCall, decode_output
from pool.client.connection import Connection, Event, LoopSink, Submission, ThreadSink
from pool.errors import TaskTimeout, error_from_wire
from worker import protocol as P


def _timeout_error(call: RemoteCall) -> TaskTimeout:
    return TaskTimeout(
        f"the call did not finish within its timeout of {call.timeout:g}s and was cancelled on the "
        "worker; raise timeout= on RunnableK8s, or add workers if calls wait in the queue"
    )


class _Calls:
    """One caller's tasks: submitted at most ``window`` at a time, with their deadlines.

    ``handle`` and ``timeouts`` turn events into ``(index, final, value)`` items: a streamed chunk
    (``final`` False), or the call's outcome (``final`` True: its output, or the exception to raise
    or return). The sync and async drivers below only wait for events and pass them here.
    """

    def __init__(self, connection: Connection, calls: Sequence[RemoteCall], kind: str, sink: Any,
                 window: int | None = None) -> None:
        self.connection = connection
        self.calls = calls
        self.kind = kind
        self.sink = sink
        self.window = window or len(calls)
        self.next_index = 0
        self.open: dict[bytes, tuple[int, RemoteCall, float | None]] = {}

    @property
    def done(self) -> bool:
        return self.next_index >= len(self.calls) and not self.open

    def refill(self) -> None:
        while self.next_index < len(self.calls) and len(self.open) < self.window:
            call = self.calls[self.next_index]
            self.connection.check_size(call.runnable, call.input)
            task_id = self.connection.new_task_id()
            header = P.TaskHeader(self.kind, call.digest, call.timeout, call.retries, call.config,
                                  call.trust_workers).to_bytes()
            deadline = time.monotonic() + call.timeout if call.timeout is not None else None
            self.open[task_id] = (self.next_index, call, deadline)
            self.connection.submit(Submission(task_id, header, call.digest, call.runnable, call.input, self.sink))
            self.next_index += 1

    def wait_time(self) -> float | None:
        deadlines = [d for _, _, d in self.open.values() if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def handle(self, event: Event) -> list[tuple[int, bool, Any]]:
        entry = self.open.get(event.task_id)
        if entry is None:
            return []  # a late event of a task given up on
        if event.kind == "chunk":
            try:
                return [(entry[0], False, decode_output(event.data, entry[1].trust_workers))]
            except Exception as exc:  # noqa: BLE001 - a refused chunk ends the call with its error
                del self.open[event.task_id]
                self.connection.cancel(event.task_id)
                self.refill()
                return [(entry[0], True, exc)]
        del self.open[event.task_id]
        self.refill()
        if self.kind == "stream" and event.kind == "result":
            return [(entry[0], True, None)]  # the end of the stream
        return [(entry[0], True, _outcome(event, entry[1].trust_workers))]

    def timeouts(self) -> list[tuple[int, bool, Any]]:
        now = time.monotonic()
        gone = [(task_id, i, call) for task_id, (i, call, d) in self.open.items() if d is not None and d <= now]
        for task_id, _, _ in gone:
            del self.open[task_id]
            self.connection.cancel(task_id)
        self.refill()
        return [(i, True, _timeout_error(call)) for _, i, call in gone]

    def cancel_all(self) -> None:
        for task_id in list(self.open):
            del self.open[task_id]
            self.connection.cancel(task_id)


def _outcome(event: Event, trusted: bool) -> Any:
    """The value of a result event, or the exception of an error event (returned, not raised)."""
    if event.kind == "error":
        return error_from_wire(event.code, event.message, event.data, trusted)
    try:
        return decode_output(event.data, trusted)
    except Exception as exc:  # noqa: BLE001 - reported like any other failed call
        return exc


def _value(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class WarmBackend:
    """Runs :class:`RemoteCall` s on a pool through one shared :class:`Connection`."""

    def __init__(self, connection: Connection, connect_timeout: float | None = None) -> None:
        self.connection = connection
        # The caller's own patience: the shared connection may have been made by another caller.
        self.connect_timeout = connect_timeout

    # ------------------------------------------------------------------ sync

    def _run(self, calls: Sequence[RemoteCall], kind: str,
             window: int | None = None) -> Iterator[tuple[int, bool, Any]]:
        self.connection.ensure_ready(self.connect_timeout)
        sink = ThreadSink()
        state = _Calls(self.connection, calls, kind, sink, window)
        try:
            state.refill()
            while not state.done:
                try:
                    event = sink.get(state.wait_time())
                except queue.Empty:
                    yield from state.timeouts()
                    continue
                yield from state.handle(event)
        finally:
            state.cancel_all()

    def invoke(self, call: RemoteCall) -> Any:
        for _, _, outcome in self._run([call], "invoke"):
            return _value(outcome)
        raise AssertionError("unreachable: every call ends with an outcome")

    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        for index, outcome in self.as_completed(calls, max_concurrency):
            results[index] = outcome if return_exceptions else _value(outcome)  # raising cancels the rest
        return results

    def as_completed(self, calls: Sequence[RemoteCall], max_concurrency: int | None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output or exception)`` as each call finishes; at most
        ``max_concurrency`` in flight."""
        for index, _, outcome in self._run(calls, "invoke", max_concurrency):
            yield index, outcome

    def stream(self, call: RemoteCall) -> Iterator[Any]:
        for _, final, value in self._run([call], "stream"):
            if final:
                _value(value)
                return
            yield value

    # ------------------------------------------------------------------ async

    async def _arun(self, calls: Sequence[RemoteCall], kind: str,
                    window: int | None = None) -> AsyncGenerator[tuple[int, bool, Any], None]:
        if not self.connection.ready:
            # Only while connecting: a thread waits for the handshake so the loop does not.
            await asyncio.get_running_loop().run_in_executor(None, self.connection.ensure_ready, self.connect_timeout)
        sink = LoopSink()
        state = _Calls(self.connection, calls, kind, sink, window)
        try:
            state.refill()
            while not state.done:
                try:
                    event = await sink.get(state.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    for item in state.timeouts():
                        yield item
                    continue
                for item in state.handle(event):
                    yield item
        finally:
            state.cancel_all()

    async def ainvoke(self, call: RemoteCall) -> Any:
        iterator = self._arun([call], "invoke")
        try:
            async for _, _, outcome in iterator:
                return _value(outcome)
        finally:
            await iterator.aclose()
        raise AssertionError("unreachable: every call ends with an outcome")

    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        iterator = self._arun(calls, "invoke", max_concurrency)
        try:
            async for index, _, outcome in iterator:
                results[index] = outcome if return_exceptions else _value(outcome)
        finally:
            await iterator.aclose()
        return results

    async def astream(self, call: RemoteCall) -> AsyncIterator[Any]:
        iterator = self._arun([call], "stream")
        try:
            async for _, final, value in iterator:
                if final:
                    _value(value)
                    return
                yield value
        finally:
            await iterator.aclose()
