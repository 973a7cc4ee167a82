"""Warm mode: calls go to a broker over the process's shared connection.

Every way of calling (invoke, stream, batch, as completed; sync and async) is one loop over task
events. A batch travels as sub-batches (:func:`plan_sub_batches`): several items in one task, run
on the worker with the runnable's own ``batch_as_completed`` / ``abatch_as_completed``, each
item's outcome streamed back as it finishes; ``max_concurrency`` counts items, not tasks.

The broker's allowance for this client (its ``--client-queue-bytes``) shapes the flow without
failing anyone: the connection holds back what does not fit yet (``connection``, backpressure); a
sub-batch larger than a share of the allowance is cut smaller here, so that several travel at once
and none is refused for good; a sub-batch the broker still refuses as never fitting
(``E_QUEUE_FULL``) goes again item by item. A call that times out while waiting for the allowance
says so, and how to raise it.

A single call (``invoke``, ``stream`` and their async twins) of a ``RunnableK8s(...,
hedge_after=...)`` with no thread (``affinity``) takes the hedged path (``pool.client.hedged_call``):
still silent after its hedge delay, it is sent once more to another worker and the first to answer
wins. Sub-batches are never hedged. With ``hedge_after`` None (the default) a call pays one
attribute test for it.

Whatever ends a call early (its timeout, an exception in the caller such as
KeyboardInterrupt, a consumer closing a stream, a cancelled asyncio task) reaches a ``finally``
that cancels the task, so the worker stops and its slot is freed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from pool.client import hedging
from pool.client.calls import RemoteCall, encode_batch_input
from pool.client.connection import Connection, Event, LoopSink, ReaderSink, Submission, ThreadSink
from pool.client.hedged_call import Race
from pool.client.one_task import (
    OneTask,
    allowance_timeout,
    deadline_of,
    decoded,
    single_step,
    task_header,
    timeout_error,
    value_of,
)
from pool.client.settings import KEYS_ENV
from pool.errors import (
    AuthenticationFailed,
    PayloadTooLarge,
    PoolUnavailable,
    ProtocolError,
    SerializationError,
    error_from_wire,
)
from worker import defaults
from worker import protocol as P

NO_KEYS_ADVICE = (
    f"This client has no keys (keys= and {KEYS_ENV} are both unset): pass keys=\"DIR/clients/NAME\" "
    f"from the `runnable-k8s keys DIR` tree the broker's keys come from, or set {KEYS_ENV} to that folder."
)

# What the event handling below yields: (the caller's index, final, value); final is False for a
# chunk, True for an outcome, None for a relayed callback event.
_Item = tuple[int, bool | None, Any]


class _Unit:
    """What one task carries: one call, or (a sub-batch) several calls of one batch that share
    their wire config, kwargs, timeout and retries. ``left``: positions not reported yet."""

    __slots__ = ("indices", "calls", "retries", "batch", "left")

    def __init__(self, indices: list[int], calls: list[RemoteCall], retries: int, batch: bool) -> None:
        self.indices = indices  # the caller's index of each item
        self.calls = calls
        self.retries = retries
        self.batch = batch  # sent as a "batch" task (more than one item)
        self.left = set(range(len(calls)))


def _singles(calls: Sequence[RemoteCall]) -> list[_Unit]:
    return [_Unit([i], [call], call.retries, False) for i, call in enumerate(calls)]


def plan_sub_batches(calls: Sequence[RemoteCall], workers: int, max_concurrency: int | None,
                     whole: bool = False) -> list[_Unit]:
    """Calls of one batch grouped into sub-batches: calls go together when their wire config,
    kwargs (one object per ``batch()`` call), runnable, timeout, retries and trust are the same.
    A group of n becomes ``min(n, max(1, workers) * BATCH_PARTS_PER_WORKER)`` parts of equal size,
    none over ``BATCH_MAX_ITEMS`` nor over ``max_concurrency``; a part of one item is a plain
    invoke task. Parts keep the order of their first item. ``whole``: one part per group (up to
    ``BATCH_MAX_ITEMS``), for calls gathered across callers so that one worker makes one request
    for all of them (``pool.client.coalescing``), not spread over the workers as a batch is."""
    groups: dict[Any, list[int]] = {}
    for index, call in enumerate(calls):
        if call.kwargs is None or call.relay is not None:  # a listened-to call's events need a task of its own
            key: Any = ("alone", index)
        else:
            key = (json.dumps(call.config, sort_keys=True, default=str), id(call.kwargs), call.digest,
                   call.timeout, call.retries, call.trust_workers)
        groups.setdefault(key, []).append(index)
    units = []
    for indices in groups.values():
        n = len(indices)
        parts = 1 if whole else min(n, max(1, workers) * defaults.BATCH_PARTS_PER_WORKER)
        size = min(-(-n // parts), defaults.BATCH_MAX_ITEMS, max_concurrency or n)
        for start in range(0, n, size):
            chunk = indices[start:start + size]
            units.append(_Unit(chunk, [calls[i] for i in chunk], calls[chunk[0]].retries, len(chunk) > 1))
    units.sort(key=lambda unit: unit.indices[0])
    return units


class _Calls:
    """One caller's tasks: submitted while at most ``window`` items are in flight, with their
    deadlines.

    ``handle`` and ``timeouts`` turn events into ``(index, final, value)`` items: a streamed chunk
    (``final`` False), or an item's outcome (``final`` True: its output, or the exception to raise
    or return), or a relayed callback event (``final`` None: the drivers below replay it into the
    call's ``relay`` before they go on, so callbacks keep their order with chunks and the result).
    The sync and async drivers only wait for events and pass them here.

    A sub-batch task reports each item as a CHUNK (``protocol.unpack_item``) and ends with an
    empty RESULT; when it ends early (an ERROR, its deadline, a malformed item) the items not
    reported yet get that error and those reported keep theirs. A worker lost after some items
    were reported (the broker retries a task only when nothing of it streamed) sends the rest
    again as a new sub-batch if the calls have retries left.
    """

    def __init__(self, connection: Connection, calls: Sequence[RemoteCall], kind: str, sink: Any,
                 window: int | None = None, units: list[_Unit] | None = None,
                 patience: float | None = None) -> None:
        self.connection = connection
        self.patience = patience  # the caller's connect_timeout: how long a call waits for a broker
        self.kind = kind
        self.sink = sink
        self.window = window or len(calls)
        self.units: deque[_Unit] = deque(units if units is not None else _singles(calls))
        self.in_flight = 0  # items submitted and not reported
        self.open: dict[bytes, tuple[_Unit, float | None]] = {}

    @property
    def done(self) -> bool:
        return not self.units and not self.open

    def refill(self) -> list[_Item]:
        """Submit what the window allows. Returns the outcomes of items that could not be sent
        (an input that cannot be encoded, or is too large): each fails in its place, alone, and
        the others go on (a sub-batch holding one is sent again item by item)."""
        units = self.units
        failed: list[_Item] = []
        while units and (not self.open or self.in_flight + len(units[0].calls) <= self.window):
            unit = units.popleft()
            first = unit.calls[0]
            try:
                if unit.batch:
                    blob = encode_batch_input([call.value for call in unit.calls], first.kwargs or {})
                else:
                    blob = first.encoded_input()
                self.connection.check_size(first.runnable, blob)
            except (PayloadTooLarge, SerializationError) as exc:
                if unit.batch:
                    units.extendleft(reversed(_singles_of(unit)))  # each item on its own: only the bad one fails
                else:
                    failed.extend(self._fail_left(unit, lambda call, error=exc: error))
                continue
            if unit.batch and self._too_big_a_share(unit, blob):
                continue
            task_id = self.connection.new_task_id()
            header = (task_header(first, self.kind, unit.retries) if not unit.batch
                      else P.TaskHeader("batch", first.digest, first.timeout, unit.retries, first.config,
                                        first.trust_workers, len(unit.calls), affinity=first.affinity).to_bytes())
            deadline = deadline_of(first)
            self.open[task_id] = (unit, deadline)
            self.in_flight += len(unit.calls)
            self.connection.submit(Submission(task_id, header, first.digest, first.runnable, blob, self.sink,
                                              patience=self.patience))
        return failed

    def _too_big_a_share(self, unit: _Unit, blob: bytes) -> bool:
        """Cut a sub-batch holding more than a share of this client's allowance in the broker
        into parts that fit the share (put back first in line, in order) and return True: whole,
        it would travel alone, or never fit at all."""
        allowance = self.connection.client_allowance()
        if allowance is None:
            return False
        share = allowance // defaults.BATCH_PARTS_PER_WORKER
        if len(blob) <= share:
            return False
        per_item = max(1, len(blob) // len(unit.calls))
        size = max(1, min(len(unit.calls) - 1, share // per_item))
        parts = [_Unit(unit.indices[i:i + size], unit.calls[i:i + size], unit.retries, len(unit.calls[i:i + size]) > 1)
                 for i in range(0, len(unit.calls), size)]
        self.units.extendleft(reversed(parts))
        return True

    def wait_time(self) -> float | None:
        deadlines = [d for _, d in self.open.values() if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _end(self, task_id: bytes, unit: _Unit, cancel: bool) -> None:
        del self.open[task_id]
        self.in_flight -= len(unit.left)
        if cancel:
            self.connection.cancel(task_id)

    def _fail_left(self, unit: _Unit, error: Any) -> list[_Item]:
        """Each unreported item's outcome: ``error(call)``, a new exception per item."""
        out: list[_Item] = [(unit.indices[p], True, error(unit.calls[p])) for p in sorted(unit.left)]
        unit.left.clear()
        return out

    def handle(self, event: Event) -> list[_Item]:
        entry = self.open.get(event.task_id)
        if entry is None:
            return []  # a late event of a task given up on
        unit = entry[0]
        if unit.batch:
            out = self._handle_batch(event, unit)
            return out + self.refill()
        step = single_step(event, unit.calls[0], self.kind)
        if step is None:
            return []
        final, value = step
        if not final:
            return [(unit.indices[0], final, value)]
        self._end(event.task_id, unit, cancel=event.kind == "chunk")
        return [(unit.indices[0], final, value), *self.refill()]

    def _handle_batch(self, event: Event, unit: _Unit) -> list[_Item]:
        task_id = event.task_id
        if event.kind == "event":
            return []  # not asked for: a sub-batch never carries a listened-to call
        if event.kind == "chunk":
            try:
                position, code, message, payload = P.unpack_item(event.data, len(unit.calls))
                if position not in unit.left:
                    raise ValueError(f"batch item {position} was reported twice")
            except ValueError as exc:  # a broken worker: end the task, never guess
                self._end(task_id, unit, cancel=True)
                why = f"a worker sent a malformed batch item ({exc}); the items not reported yet failed"
                return self._fail_left(unit, lambda call: ProtocolError(why))
            unit.left.discard(position)
            self.in_flight -= 1
            trusted = unit.calls[position].trust_workers
            outcome = (error_from_wire(code, message, payload, trusted) if code is not None
                       else decoded(payload, trusted))
            return [(unit.indices[position], True, outcome)]
        self._end(task_id, unit, cancel=False)
        if event.kind == "result":
            return self._fail_left(unit, lambda call: ProtocolError(
                "the worker ended a batch task without reporting every item"))
        reported = len(unit.left) < len(unit.calls)
        if event.code == P.E_QUEUE_FULL and not reported and len(unit.calls) > 1:
            # Refused as never fitting in the broker whole: each item on its own may.
            self.units.extendleft(reversed(_singles_of(unit)))
            unit.left.clear()
            return []
        if event.code == P.E_WORKER_LOST and reported and unit.retries > 0 and unit.left:
            positions = sorted(unit.left)
            calls = [unit.calls[p] for p in positions]
            self.units.appendleft(_Unit([unit.indices[p] for p in positions], calls, unit.retries - 1,
                                        len(calls) > 1))
            unit.left.clear()
            return []
        return self._fail_left(unit, lambda call: error_from_wire(event.code, event.message, event.data,
                                                                  call.trust_workers))

    def timeouts(self) -> list[_Item]:
        now = time.monotonic()
        gone = [(task_id, unit) for task_id, (unit, d) in self.open.items() if d is not None and d <= now]
        out = []
        for task_id, unit in gone:
            waiting = self.connection.waiting_for_allowance(task_id)
            self._end(task_id, unit, cancel=True)
            error = (timeout_error if waiting is None
                     else allowance_timeout(waiting, self.connection.allowance_advice()))
            out.extend(self._fail_left(unit, error))
        return out + self.refill()

    def cancel_all(self) -> None:
        for task_id in list(self.open):
            del self.open[task_id]
            self.connection.cancel(task_id)


# What a stream's deadline timer delivers to its sink (``WarmBackend.astream``).
_DEADLINE = object()


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _race(connection: Connection, call: RemoteCall, kind: str, sink: Any, patience: float | None) -> Race:
    """A hedged call's race, with its runnable's hedge delay as of now."""
    state = hedging.state_for(call.digest)
    return Race(connection, call, kind, sink, patience, state, state.delay(call.hedge_after))


def _singles_of(unit: _Unit) -> list[_Unit]:
    return [_Unit([i], [call], unit.retries, False) for i, call in zip(unit.indices, unit.calls, strict=True)]


class WarmBackend:
    """Runs :class:`RemoteCall` s on a pool through one shared :class:`Connection`.

    ``invoke`` and ``stream`` (sync and async) take the short path of one task (:class:`OneTask`);
    ``batch`` and ``as_completed`` plan sub-batches and keep a window (:class:`_Calls`). A call's
    input may arrive unencoded (``RemoteCall.value``): it is encoded when it is sent.

    ``reconnect`` makes the connection again once it was closed (``Connection.close_all``, a pool
    shut down): a RunnableK8s keeps its backend for its life, and must not keep a dead connection.
    """

    def __init__(self, connection: Connection, connect_timeout: float | None = None,
                 reconnect: Callable[[], Connection] | None = None, unanswered_note: str | None = None) -> None:
        self._connection = connection
        # The caller's own patience: the shared connection may have been made by another caller.
        self.connect_timeout = connect_timeout
        self._reconnect = reconnect
        # Added to "no broker answered": how this backend came to be chosen (auto mode's pool).
        self.unanswered_note = unanswered_note

    @property
    def connection(self) -> Connection:
        connection = self._connection
        if connection.closed and self._reconnect is not None:
            connection = self._connection = self._reconnect()
        return connection

    def ensure_ready(self, timeout: float | None = None) -> Connection:
        """The connection once the broker has welcomed it (``PoolUnavailable`` if none does within
        ``timeout``, default the caller's connect timeout). A refused handshake of a client with
        no keys says to pass them: the broker has keys and wants this client's."""
        connection = self.connection
        try:
            connection.ensure_ready(self.connect_timeout if timeout is None else timeout)
        except AuthenticationFailed as exc:
            if connection.keys is None:
                raise AuthenticationFailed(f"{exc} {NO_KEYS_ADVICE}") from exc
            raise
        except PoolUnavailable as exc:
            if self.unanswered_note and type(exc) is PoolUnavailable:
                raise PoolUnavailable(f"{exc} {self.unanswered_note}") from exc
            raise
        return connection

    async def aensure_ready(self) -> Connection:
        connection = self.connection
        if connection.ready:
            return connection
        # Only while connecting: a thread waits for the handshake so the loop does not.
        return await asyncio.get_running_loop().run_in_executor(None, self.ensure_ready)

    def _plan(self, connection: Connection, calls: Sequence[RemoteCall], window: int | None,
              whole: bool = False) -> list[_Unit] | None:
        if len(calls) < 2:
            return None
        return plan_sub_batches(calls, connection.ready_workers(), window, whole)

    # ------------------------------------------------------------------ one call, sync

    def _one(self, call: RemoteCall, kind: str) -> Iterator[tuple[bool, Any]]:
        """``(False, chunk)`` ... then ``(True, outcome)`` of one call in one task (or two, hedged)."""
        if call.hedge_after is not None and call.affinity is None:
            yield from self._hedged(call, kind)
            return
        connection = self.ensure_ready()
        sink = ReaderSink()
        one = OneTask(connection, call, kind, sink, self.connect_timeout)
        try:
            one.start()
            while True:
                try:
                    event = connection.wait(sink, one.wait_time())
                except queue.Empty:
                    yield True, one.timed_out()
                    return
                step = one.step(event)
                if step is None:
                    continue
                if step[0] is None:
                    call.relay.replay(step[1])
                    continue
                yield step[0], step[1]
                if step[0]:
                    return
        finally:
            one.close()

    def _hedged(self, call: RemoteCall, kind: str) -> Iterator[tuple[bool, Any]]:
        """``_one`` for a call that may be hedged: one sink for both tasks, one wait until the
        next reply, the hedge delay or the deadline, whichever comes first."""
        connection = self.ensure_ready()
        sink = ReaderSink()
        race = _race(connection, call, kind, sink, self.connect_timeout)
        try:
            race.start()
            while True:
                try:
                    event = connection.wait(sink, race.wait_time())
                except queue.Empty:
                    due = race.due()
                    if due is not None:
                        yield True, due[1]
                        return
                    continue
                for final, value in race.step(event):
                    if final is None:
                        call.relay.replay(value)
                        continue
                    yield final, value
                    if final:
                        return
        finally:
            race.close()

    def invoke(self, call: RemoteCall) -> Any:
        """One call; the caller reads its own reply when no other caller is reading
        (``Connection.wait``)."""
        for final, value in self._one(call, "invoke"):
            if final:
                return value_of(value)
        raise AssertionError("a call's replies ended without an outcome")  # _one always ends with one

    def stream(self, call: RemoteCall) -> Iterator[Any]:
        for final, value in self._one(call, "stream"):
            if final:
                value_of(value)
                return
            yield value

    # ------------------------------------------------------------------ many calls, sync

    def _run(self, calls: Sequence[RemoteCall], window: int | None, whole: bool = False) -> Iterator[_Item]:
        connection = self.ensure_ready()
        sink = ThreadSink()
        state = _Calls(connection, calls, "invoke", sink, window, self._plan(connection, calls, window, whole),
                       self.connect_timeout)
        try:
            yield from state.refill()
            while not state.done:
                try:
                    event = sink.get(state.wait_time())
                except queue.Empty:
                    yield from state.timeouts()
                    continue
                for item in state.handle(event):
                    if item[1] is None:
                        calls[item[0]].relay.replay(item[2])
                    else:
                        yield item
        finally:
            state.cancel_all()

    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        for index, outcome in self.as_completed(calls, max_concurrency):
            results[index] = outcome if return_exceptions else value_of(outcome)  # raising cancels the rest
        return results

    def gathered_batch(self, calls: Sequence[RemoteCall]) -> list[Any]:
        """Each call's output or exception, the calls sent as one batch task (or one per
        ``BATCH_MAX_ITEMS``) rather than spread over the workers: calls gathered across callers,
        which share one request on the worker (``pool.client.coalescing``)."""
        results: list[Any] = [None] * len(calls)
        for index, _, outcome in self._run(calls, None, whole=True):
            results[index] = outcome
        return results

    def as_completed(self, calls: Sequence[RemoteCall], max_concurrency: int | None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output or exception)`` as each call finishes; at most
        ``max_concurrency`` in flight."""
        for index, _, outcome in self._run(calls, max_concurrency):
            yield index, outcome

    # ------------------------------------------------------------------ one call, async

    async def _aready(self) -> Connection:
        connection = self._connection
        if connection.closed or not connection.ready:
            connection = await self.aensure_ready()
        return connection

    async def ainvoke(self, call: RemoteCall) -> Any:
        """One call, awaited in this coroutine: no generator, no task of its own."""
        if call.hedge_after is not None and call.affinity is None:
            hedged = self._ahedged(call, "invoke")
            try:
                async for over, outcome in hedged:
                    if over:
                        return value_of(outcome)
            finally:
                await hedged.aclose()  # its finally cancels what still runs, now rather than when collected
        one = OneTask(await self._aready(), call, "invoke", LoopSink(), self.connect_timeout)
        sink = one.sink
        try:
            one.start()
            while True:
                try:
                    event = await sink.get(one.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    return value_of(one.timed_out())
                step = one.step(event)
                if step is None:
                    continue
                final, value = step
                if final is None:
                    await call.relay.replay(value)
                elif final:
                    return value_of(value)
        finally:
            one.close()

    async def _ahedged(self, call: RemoteCall, kind: str) -> AsyncGenerator[tuple[bool, Any], None]:
        """:meth:`_hedged` for a coroutine. It waits with a timeout per reply (the next of the
        hedge delay and the deadline), a timer per await that the unhedged path does without."""
        race = _race(await self._aready(), call, kind, LoopSink(), self.connect_timeout)
        sink = race.sink
        try:
            race.start()
            while True:
                try:
                    event = await sink.get(race.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    due = race.due()
                    if due is not None:
                        yield True, due[1]
                        return
                    continue
                for final, value in race.step(event):
                    if final is None:
                        await call.relay.replay(value)
                        continue
                    yield final, value
                    if final:
                        return
        finally:
            race.close()

    async def astream(self, call: RemoteCall) -> AsyncIterator[Any]:
        """One streamed call: the only async generator between its caller and the sink. Every
        reply already in the sink is handled without waiting (``LoopSink.get`` returns at once
        when it holds one), so a burst of chunks costs one wake-up of the loop. The call's
        deadline is one timer for the whole stream (it delivers ``_DEADLINE`` to the sink), not
        one armed and cancelled per chunk awaited."""
        if call.hedge_after is not None and call.affinity is None:
            hedged = self._ahedged(call, "stream")
            try:
                async for over, chunk in hedged:
                    if over:
                        value_of(chunk)
                        return
                    yield chunk
            finally:
                await hedged.aclose()
            return
        one = OneTask(await self._aready(), call, "stream", LoopSink(), self.connect_timeout)
        sink = one.sink
        timer = (asyncio.get_running_loop().call_at(_loop_time(one.deadline), sink.deliver, _DEADLINE)
                 if one.deadline is not None else None)
        try:
            one.start()
            while True:
                event = await sink.get(None)
                if event is _DEADLINE:
                    value_of(one.timed_out())
                step = one.step(event)
                if step is None:
                    continue
                final, value = step
                if final is None:
                    await call.relay.replay(value)
                elif final:
                    value_of(value)
                    return
                else:
                    yield value
        finally:
            if timer is not None:
                timer.cancel()
            one.close()

    # ------------------------------------------------------------------ many calls, async

    async def _arun(self, calls: Sequence[RemoteCall], window: int | None,
                    whole: bool = False) -> AsyncGenerator[_Item, None]:
        connection = await self.aensure_ready()
        sink = LoopSink()
        state = _Calls(connection, calls, "invoke", sink, window, self._plan(connection, calls, window, whole),
                       self.connect_timeout)
        try:
            for item in state.refill():
                yield item
            while not state.done:
                try:
                    event = await sink.get(state.wait_time())
                except (asyncio.TimeoutError, TimeoutError):
                    for item in state.timeouts():
                        yield item
                    continue
                for item in state.handle(event):
                    if item[1] is None:
                        await calls[item[0]].relay.replay(item[2])
                    else:
                        yield item
        finally:
            state.cancel_all()

    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        iterator = self._arun(calls, max_concurrency)
        try:
            async for index, _, outcome in iterator:
                results[index] = outcome if return_exceptions else value_of(outcome)
        finally:
            await iterator.aclose()
        return results

    async def agathered_batch(self, calls: Sequence[RemoteCall]) -> list[Any]:
        """:meth:`gathered_batch`, awaited."""
        results: list[Any] = [None] * len(calls)
        iterator = self._arun(calls, None, whole=True)
        try:
            async for index, _, outcome in iterator:
                results[index] = outcome
        finally:
            await iterator.aclose()
        return results

    async def aas_completed(self, calls: Sequence[RemoteCall],
                            max_concurrency: int | None) -> AsyncIterator[tuple[int, Any]]:
        """:meth:`as_completed` for a coroutine."""
        iterator = self._arun(calls, max_concurrency)
        try:
            async for index, _, outcome in iterator:
                yield index, outcome
        finally:
            await iterator.aclose()
