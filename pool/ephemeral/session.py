"""Ephemeral mode: each call runs in a fresh one-shot worker (a Pod, or a local subprocess).

The session is the same whatever carries it: start a worker through a *launcher*, say HELLO over
its stdin, wait for READY, send the TASK, read CHUNK lines until RESULT or ERROR, and stop the
worker — in every outcome, including a timeout, an exception in the caller, a stream closed early
and a cancelled asyncio task (``Session.abort`` may be called from any thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pool.client.calls import RemoteCall, decode_output
from pool.errors import (
    PayloadTooLarge,
    PodFailed,
    RunnableK8sError,
    TaskTimeout,
    WorkerLineTooLong,
    WorkerLost,
    error_from_wire,
)
from worker import defaults
from worker import protocol as P
from worker.stdio_lines import LINE_SLACK_BYTES, MAX_LINE_BYTES, LineTooLong


class Channel(Protocol):
    """A started one-shot worker's stdin and stdout."""

    def write(self, data: bytes) -> None:
        """Send ``data`` (it may wait for the worker to read; raises ``TimeoutError`` once the
        call's deadline passed, and nothing when the worker is gone: reading says why)."""
        ...

    def read_line(self, timeout: float | None) -> bytes:
        """The next line (b"" once the worker's output ended); raises ``TimeoutError``, and
        ``LineTooLong`` for a line over ``MAX_LINE_BYTES`` (having read at most that much of it)."""
        ...

    def failure(self) -> BaseException:
        """Why the worker ended without a result (exit code, Pod reason, log tail)."""
        ...

    def close(self) -> None:
        """Stop the worker and release it (kill the process, delete the Pod); idempotent."""
        ...


class Launcher(Protocol):
    def launch(self, deadline: float | None) -> Channel: ...


class Session:
    """One call on one fresh worker."""

    def __init__(self, launcher: Launcher, call: RemoteCall, kind: str,
                 on_event: Callable[[bytes], None] | None = None, why: str | None = None) -> None:
        self.launcher = launcher
        # Why this call runs on a fresh worker rather than a pool (auto mode's fallback): added to
        # an error starting one, so that a Pod that cannot start is not mistaken for the problem.
        self.why = why
        self.call = call
        self.kind = kind
        # Where relayed callback events go (the call's relay, on the caller's side); when None
        # the worker is asked for none.
        self.on_event = on_event
        self.deadline = time.monotonic() + call.timeout if call.timeout is not None else None
        self._channel: Channel | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            channel = self._channel
        if channel is not None:
            channel.close()

    def events(self) -> Iterator[tuple[bytes, bytes]]:
        """``(CHUNK, data)`` ... then ``(RESULT, data)``; errors are raised."""
        header = P.TaskHeader(self.kind, self.call.digest, self.call.timeout, 0, self.call.config,
                              self.call.trust_workers, events=self.on_event is not None,
                              tokens=self.call.relay is not None and self.call.relay.tokens)
        task = P.stdio_line(P.TASK, header.to_bytes(), self.call.runnable, self.call.encoded_input())
        if len(task) > MAX_LINE_BYTES:  # the worker would refuse it: say so before starting one
            raise PayloadTooLarge(
                f"the runnable, input and config come to {len(task)} bytes as a line to the one-shot worker, "
                f"over its limit of {MAX_LINE_BYTES} (the largest message, {defaults.MAX_MESSAGE_BYTES} bytes, "
                f"as base64, plus {LINE_SLACK_BYTES}). Send less data (pass a reference such as a URL instead)."
            )
        channel = self._launch()
        with self._lock:
            self._channel = channel
            aborted = self._aborted
        try:
            if aborted:
                raise asyncio.CancelledError()
            # The worker is starting (a Python process importing LangChain, or a Pod's container):
            # frame HELLO and the TASK now and send both at once, so that they wait in its stdin
            # while it starts instead of the TASK following READY a round trip later. The worker
            # reads them in the same order as before: HELLO, (READY), TASK; one that refuses HELLO
            # answers ERROR and exits without reading the TASK.
            self._write(channel, P.stdio_line(P.HELLO, P.encode_json(P.environment())) + task)
            command, _ = self._next(channel)
            if command != P.READY:
                raise WorkerLost(f"the one-shot worker answered HELLO with {P.COMMAND_NAMES.get(command)}")
            while True:
                command, fields = self._next(channel)
                if command == P.CHUNK and fields:
                    yield command, fields[0]
                elif command == P.EVENT and fields and self.on_event is not None:
                    self.on_event(fields[0])
                elif command == P.RESULT:
                    yield command, fields[0] if fields else b""
                    return
        finally:
            self.abort()

    def _launch(self) -> Channel:
        """A started worker; a launcher's own failure (a Kubernetes client error, an OSError)
        becomes ``PodFailed`` saying so, and every failure says why this call needed a worker."""
        try:
            return self.launcher.launch(self.deadline)
        except RunnableK8sError as exc:
            _told_why(exc, self.why)
            raise
        except Exception as exc:  # the Kubernetes client's or the OS's own error, raised as ours
            error = PodFailed(f"the one-shot worker could not be started: {type(exc).__name__}: {exc}",
                              reason=type(exc).__name__)
            raise _told_why(error, self.why) from exc

    def _write(self, channel: Channel, data: bytes) -> None:
        try:
            channel.write(data)
        except TimeoutError:  # a channel that knows the deadline (a pipe the worker does not empty)
            raise self._timeout() from None

    def _next(self, channel: Channel) -> tuple[bytes, list[bytes]]:
        while True:
            timeout = None if self.deadline is None else self.deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise self._timeout()
            try:
                line = channel.read_line(timeout)
            except TimeoutError:
                raise self._timeout() from None
            except LineTooLong as exc:  # the caller's finally stops the worker
                raise WorkerLineTooLong(
                    f"{exc}. It is not a runnable-k8s worker of this version, or something else writes to "
                    "its stdout; it was stopped. Check that the image runs `python -m worker --stdio` from the "
                    "same runnable-k8s version as this client."
                ) from None
            if not line:
                raise channel.failure()
            message = P.parse_stdio_line(line)
            if message is None:
                continue
            command, fields = message
            if command == P.ERROR:
                code, text, detail = [*fields, b"", b"", b"", b""][1:4]
                raise error_from_wire(code, text.decode("utf-8", "replace"), detail, self.call.trust_workers)
            return command, fields

    def _timeout(self) -> TaskTimeout:
        return TaskTimeout(
            f"the call did not finish within its timeout of {self.call.timeout:g}s; its one-shot "
            "worker was stopped. Raise timeout= on RunnableK8s (a Pod per call needs seconds to start)"
        )

    # ------------------------------------------------------------------ shapes of a call

    def invoke(self) -> Any:
        for command, data in self.events():
            if command == P.RESULT:
                return decode_output(data, self.call.trust_workers)
        raise WorkerLost("the one-shot worker ended without a result")

    def stream(self) -> Iterator[Any]:
        for command, data in self.events():
            if command == P.CHUNK:
                yield decode_output(data, self.call.trust_workers)


class EphemeralBackend:
    """Runs each :class:`RemoteCall` in a fresh worker started by ``launcher``.

    Each call is its own worker, so there is nothing to batch: ``batch`` and ``as_completed`` run
    one session per item in threads (``abatch``/``aas_completed``: asyncio tasks), at most
    ``max_concurrency`` at once, and stop the workers still running when the caller leaves.
    ``why``: when auto mode fell back to this backend, the reason, added to launch errors.
    """

    def __init__(self, launcher: Launcher, why: str | None = None) -> None:
        self.launcher = launcher
        self.why = why

    def _session(self, call: RemoteCall, kind: str, on_event: Callable[[bytes], None] | None) -> Session:
        return Session(self.launcher, call, kind, on_event, self.why)

    def invoke(self, call: RemoteCall) -> Any:
        return self._session(call, "invoke", _sync_relay(call)).invoke()

    def stream(self, call: RemoteCall) -> Iterator[Any]:
        yield from self._session(call, "stream", _sync_relay(call)).stream()

    def as_completed(self, calls: Sequence[RemoteCall], max_concurrency: int | None) -> Iterator[tuple[int, Any]]:
        """``(index, output or exception)`` as each item's worker finishes."""
        if not calls:
            return
        sessions = [self._session(call, "invoke", _sync_relay(call)) for call in calls]
        executor = ThreadPoolExecutor(max_workers=max(1, min(max_concurrency or len(calls), len(calls))),
                                      thread_name_prefix="runnable-k8s-ephemeral")
        futures = {executor.submit(_outcome, session.invoke): index for index, session in enumerate(sessions)}
        left = set(futures.values())
        try:
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                left.discard(index)
                yield index, future.result()
        finally:
            # The caller stopped early, one raised, or KeyboardInterrupt: stop every worker still running.
            executor.shutdown(wait=False, cancel_futures=True)
            for index in left:
                sessions[index].abort()

    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]:
        """One worker per item, in parallel, at most ``max_concurrency`` at once."""
        return _collect(self.as_completed(calls, max_concurrency), len(calls), return_exceptions)

    async def ainvoke(self, call: RemoteCall) -> Any:
        session = self._session(call, "invoke", _async_relay(call))
        try:
            return await asyncio.get_running_loop().run_in_executor(None, session.invoke)
        except asyncio.CancelledError:
            session.abort()
            raise

    async def aas_completed(self, calls: Sequence[RemoteCall],
                            max_concurrency: int | None) -> AsyncIterator[tuple[int, Any]]:
        """:meth:`as_completed` for a coroutine: one task per item."""
        limit = asyncio.Semaphore(max(1, max_concurrency or len(calls)))

        async def one(index: int, call: RemoteCall) -> tuple[int, Any]:
            async with limit:
                try:
                    return index, await self.ainvoke(call)
                except Exception as exc:  # noqa: BLE001 - returned in place, like Runnable.batch
                    return index, exc

        tasks = [asyncio.ensure_future(one(index, call)) for index, call in enumerate(calls)]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:
                task.cancel()  # ainvoke stops the worker of a task cancelled while it runs
            await asyncio.gather(*tasks, return_exceptions=True)

    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        iterator = self.aas_completed(calls, max_concurrency)
        try:
            async for index, outcome in iterator:
                if isinstance(outcome, Exception) and not return_exceptions:
                    raise outcome  # leaving cancels the rest
                results[index] = outcome
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
        return results

    async def astream(self, call: RemoteCall) -> AsyncIterator[Any]:
        """Chunks from a thread driving the session, handed over as they come."""
        session = self._session(call, "stream", _async_relay(call))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def hand_over(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:
                pass  # the consumer's loop is closed: nobody is listening

        def pump() -> None:
            try:
                for chunk in session.stream():
                    hand_over("chunk", chunk)
                hand_over("end", None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                hand_over("error", exc)

        loop.run_in_executor(None, pump)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "chunk":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            session.abort()  # the pump thread ends as soon as its worker is gone


def _told_why(error: RunnableK8sError, why: str | None) -> RunnableK8sError:
    """``error`` with ``why`` appended to its message (in ``str(error)``, where a note added with
    ``add_note``, Python 3.11 and later only, would not be)."""
    if why and error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} ({why})", *error.args[1:])
    return error


def _outcome(run: Callable[[], Any]) -> Any:
    """``run()``'s result, or the exception it raised (returned in place, like Runnable.batch)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001
        return exc


def _collect(outcomes: Iterator[tuple[int, Any]], count: int, return_exceptions: bool) -> list[Any]:
    """A batch's results in input order; without ``return_exceptions`` the first exception to come
    is raised, and leaving the iterator stops the workers still running."""
    results: list[Any] = [None] * count
    try:
        for index, outcome in outcomes:
            if isinstance(outcome, Exception) and not return_exceptions:
                raise outcome
            results[index] = outcome
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()
    return results


def _sync_relay(call: RemoteCall) -> Callable[[bytes], None] | None:
    return call.relay.replay if call.relay is not None else None


def _async_relay(call: RemoteCall) -> Callable[[bytes], None] | None:
    """For a session driven on a thread: each event is replayed on the caller's loop (async
    handlers live there) and the thread waits for it, so events keep their order with chunks."""
    if call.relay is None:
        return None
    loop = asyncio.get_running_loop()
    replay = call.relay.replay

    def on_event(data: bytes) -> None:
        try:
            asyncio.run_coroutine_threadsafe(replay(data), loop).result()
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is listening any more

    return on_event
