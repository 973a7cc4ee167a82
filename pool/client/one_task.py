"""One call as one task: what its replies mean to its caller, and the task's header.

The warm backend's short path (``invoke`` and ``stream`` of one call, :class:`OneTask`) and its
hedged path (``pool.client.hedged_call``) share these rules, so that a reply means the same to a
caller whether or not its call was hedged: :func:`single_step` turns a reply into a chunk, an
outcome or a callback event to replay; :func:`task_header` builds (or reuses) the task's header.
"""

from __future__ import annotations

import time
from typing import Any

from pool.client.calls import RemoteCall, decode_output
from pool.client.connection import Connection, Event, ReaderSink, Submission
from pool.errors import TaskTimeout, error_from_wire
from worker import protocol as P


def timeout_error(call: RemoteCall) -> TaskTimeout:
    return TaskTimeout(
        f"the call did not finish within its timeout of {call.timeout:g}s and was cancelled on the "
        "worker; raise timeout= on RunnableK8s, or add workers if calls wait in the queue"
    )


def allowance_timeout(why: str, advice: str) -> Any:
    """``timeout_error`` for a task that never left this client: it waited for the allowance."""
    def error(call: RemoteCall) -> TaskTimeout:
        return TaskTimeout(
            f"the call did not finish within its timeout of {call.timeout:g}s: it was still waiting for this "
            f"client's allowance in the broker and never reached a worker ({why}); {advice}"
        )
    return error


def task_header(call: RemoteCall, kind: str, retries: int) -> bytes:
    """The header of a task carrying one call (an invoke or a stream): built once per RunnableK8s
    and kind when the call's config is the default one (``RemoteCall.headers``)."""
    listened = call.relay is not None
    tokens = listened and call.relay.tokens
    cache = call.headers
    if cache is None:
        return P.TaskHeader(kind, call.digest, call.timeout, retries, call.config, call.trust_workers, 1,
                            events=listened, tokens=tokens, affinity=call.affinity).to_bytes()
    key = (kind, call.digest, call.timeout, retries, call.trust_workers, listened, tokens)
    header = cache.get(key)
    if header is None:
        header = cache[key] = P.TaskHeader(kind, call.digest, call.timeout, retries, call.config, call.trust_workers,
                                           1, events=listened, tokens=tokens).to_bytes()
    return header


def deadline_of(call: RemoteCall) -> float | None:
    return time.monotonic() + call.timeout if call.timeout is not None else None


def single_step(event: Event, call: RemoteCall, kind: str) -> tuple[bool | None, Any] | None:
    """What an event of a task carrying one call means to its caller: None (nothing), ``(None,
    data)`` a callback event to replay, ``(False, chunk)``, or ``(True, outcome)`` when the call is
    over: its output or exception (for a stream, None at its end). A chunk that cannot be decoded
    ends the call with its error while the task still runs: whoever gets ``(True, ...)`` for a
    ``chunk`` event cancels the task."""
    if event.kind == "event":
        return (None, event.data) if call.relay is not None else None
    if event.kind == "chunk":
        try:
            return False, decode_output(event.data, call.trust_workers)
        except Exception as exc:  # noqa: BLE001 - a refused chunk ends the call with its error
            return True, exc
    if kind == "stream" and event.kind == "result":
        return True, None  # the end of the stream
    return True, outcome_of(event, call.trust_workers)


class OneTask:
    """One call as one task: the short path of ``invoke`` and ``stream``. No plan, no window, no
    sub-batches, no bookkeeping by index: submit, wait for this task's events, cancel it if the
    caller leaves before its end. ``step`` turns an event into what :func:`single_step` says."""

    __slots__ = ("connection", "call", "kind", "sink", "patience", "task_id", "deadline", "running")

    def __init__(self, connection: Connection, call: RemoteCall, kind: str, sink: Any,
                 patience: float | None) -> None:
        self.connection = connection
        self.call = call
        self.kind = kind
        self.sink = sink
        self.patience = patience
        self.task_id = connection.new_task_id()
        self.deadline = deadline_of(call)
        self.running = False

    def start(self) -> None:
        call = self.call
        blob = call.encoded_input()
        self.connection.check_size(call.runnable, blob)
        self.running = True
        self.connection.submit(Submission(self.task_id, task_header(call, self.kind, call.retries), call.digest,
                                          call.runnable, blob, self.sink, patience=self.patience),
                               reads=isinstance(self.sink, ReaderSink))

    def wait_time(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def step(self, event: Event) -> tuple[bool | None, Any] | None:
        if event.task_id != self.task_id:
            return None
        step = single_step(event, self.call, self.kind)
        if step is not None and step[0] and event.kind != "chunk":
            self.running = False  # the task is over on the pool's side: nothing to cancel
        return step

    def timed_out(self) -> TaskTimeout:
        """The call's deadline passed: the error to raise (the task is cancelled by ``close``)."""
        waiting = self.connection.waiting_for_allowance(self.task_id)
        if waiting is None:
            return timeout_error(self.call)
        error: TaskTimeout = allowance_timeout(waiting, self.connection.allowance_advice())(self.call)
        return error

    def close(self) -> None:
        if self.running:
            self.running = False
            self.connection.cancel(self.task_id)


def decoded(data: bytes, trusted: bool) -> Any:
    try:
        return decode_output(data, trusted)
    except Exception as exc:  # noqa: BLE001 - reported like any other failed call
        return exc


def outcome_of(event: Event, trusted: bool) -> Any:
    """The value of a result event, or the exception of an error event (returned, not raised)."""
    if event.kind == "error":
        return error_from_wire(event.code, event.message, event.data, trusted)
    return decoded(event.data, trusted)


def value_of(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
