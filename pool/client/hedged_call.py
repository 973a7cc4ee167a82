"""A hedged call: one call, up to two tasks racing for its first output.

Why: an LLM call's time to first token has a long tail (a slow replica, a cold connection, a
provider that hiccups). A warm pool usually has idle slots, so a call still silent after its hedge
delay (``pool.client.hedging``) is sent once more, as a new task naming the first
(``TaskHeader.hedge_of``); the broker runs that duplicate at once on another worker with a free
slot, or refuses it (``E_NO_HEDGE``: the original is still queued or already streaming, no other
worker is free) and the caller simply keeps waiting for the original.

The rules, from the caller's side:

* The first attempt to produce *output* wins: a stream chunk, the result, the runnable's own
  exception, or (when a listener streams tokens) a model's first token event. The other is
  cancelled at once (CANCEL), and nothing it sent, before or after, reaches the caller.
* Nothing is hedged once output has reached the caller: the delay is armed only until the
  original's first output, and the broker refuses a hedge of a task that has streamed.
* A pool failure of one attempt (its worker lost, the hedge refused or cancelled, a queue
  timeout) ends that attempt only, while the other goes on; the call fails with the original's
  error only when no attempt is left. The runnable's own exception is output: it wins, as it
  would have without hedging.
* Callback events (a tracer listening: ``call.relay``) are output the caller sees, and a
  duplicate runs the model again, with its own start event. So while two attempts may race, each
  attempt's events are held; the winner's are replayed, in order, right before its first output,
  and the loser's are dropped: a tracer sees exactly one model run. The cost: while hedging is
  possible a listener hears a run's start when its first output arrives, not when it started (a
  token event counts as output, so ``astream_events`` still streams tokens as they come).
* The call keeps one deadline, the caller's: the duplicate is sent with what is left of it.
* The duplicate has no retries (a lost duplicate just leaves the original), and is sent only
  while the original has reached the broker (one waiting here for this client's allowance in the
  broker cannot be hedged).

:class:`Race` is the state of one such call, driven by the warm backend's sync and async loops
(``WarmBackend._hedged`` / ``_ahedged``) as :class:`~pool.client.one_task.OneTask` is: they wait on
one sink for both tasks' replies, until :meth:`Race.wait_time`, and pass each reply to
:meth:`Race.step`, or call :meth:`Race.due` when the wait ran out.
"""

from __future__ import annotations

import time
from typing import Any

from pool.client.calls import RemoteCall, decode_output
from pool.client.connection import Connection, Event, ReaderSink, Submission
from pool.client.hedging import HedgeState
from pool.client.one_task import allowance_timeout, deadline_of, outcome_of, single_step, task_header, timeout_error
from pool.errors import TaskTimeout
from worker import protocol as P

# Errors that end one attempt but say nothing about the call: the pool's, not the runnable's.
ATTEMPT_FAILURES = frozenset({P.E_NO_HEDGE, P.E_WORKER_LOST, P.E_CANCELLED, P.E_QUEUE_TIMEOUT, P.E_QUEUE_FULL,
                              P.E_POOL_UNAVAILABLE})

# A callback event that is output: a model's token, as a caller streaming tokens sees it.
TOKEN_EVENT = "on_llm_new_token"

Step = tuple[bool | None, Any]


class _Attempt:
    """One task of the race: the original or the duplicate."""

    __slots__ = ("task_id", "hedge", "running", "held")

    def __init__(self, task_id: bytes, hedge: bool) -> None:
        self.task_id = task_id
        self.hedge = hedge
        self.running = True  # the pool may still send something of it (cancel it when leaving)
        self.held: list[bytes] = []  # its callback events, held while another attempt may win


def hedge_header(call: RemoteCall, kind: str, original: bytes, timeout: float | None) -> bytes:
    """The duplicate's header: the original's, with no retries, what is left of the deadline and
    ``hedge_of`` naming the original."""
    listened = call.relay is not None
    return P.TaskHeader(kind, call.digest, timeout, 0, call.config, call.trust_workers, 1, events=listened,
                        tokens=listened and call.relay.tokens, hedge_of=original.hex()).to_bytes()


class Race:
    """One hedged call (see the module's docstring). ``delay``: seconds after sending the
    original at which the duplicate goes, None for never (a ``"p95"`` still gathering samples:
    then nothing is held, and the call only gives its time to first output)."""

    __slots__ = ("connection", "call", "kind", "sink", "patience", "state", "delay", "deadline", "started",
                 "hedge_at", "blob", "original", "duplicate", "winner", "failure")

    def __init__(self, connection: Connection, call: RemoteCall, kind: str, sink: Any, patience: float | None,
                 state: HedgeState, delay: float | None) -> None:
        self.connection = connection
        self.call = call
        self.kind = kind
        self.sink = sink
        self.patience = patience
        self.state = state
        self.delay = delay
        self.deadline = deadline_of(call)
        self.started = 0.0
        self.hedge_at: float | None = None  # while a duplicate may still be sent
        self.blob = b""
        self.original = _Attempt(connection.new_task_id(), hedge=False)
        self.duplicate: _Attempt | None = None
        self.winner: _Attempt | None = None
        self.failure: Event | None = None  # the original's pool failure, while the duplicate goes on

    # ------------------------------------------------------------------ sending

    def start(self) -> None:
        call = self.call
        blob = self.blob = call.encoded_input()
        self.connection.check_size(call.runnable, blob)
        self.started = time.monotonic()
        if self.delay is not None:
            self.hedge_at = self.started + self.delay
        self._submit(self.original.task_id, task_header(call, self.kind, call.retries))

    def _submit(self, task_id: bytes, header: bytes) -> None:
        call = self.call
        self.connection.submit(Submission(task_id, header, call.digest, call.runnable, self.blob, self.sink,
                                          patience=self.patience), reads=isinstance(self.sink, ReaderSink))

    def wait_time(self) -> float | None:
        """How long to wait for the next reply before :meth:`due` must be called (None: forever)."""
        soonest = self.deadline
        hedge_at = self.hedge_at
        if hedge_at is not None and (soonest is None or hedge_at < soonest):
            soonest = hedge_at
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def due(self) -> Step | None:
        """The wait ran out: the call's deadline passed (``(True, TaskTimeout)``, the tasks are
        cancelled by :meth:`close`), or its hedge delay did (the duplicate goes; None)."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            self.hedge_at = None
            return True, self._timed_out()
        if self.hedge_at is not None and now >= self.hedge_at:
            self.hedge_at = None
            self._hedge(now)
        return None

    def _hedge(self, now: float) -> None:
        original = self.original
        if self.winner is not None or not original.running:
            return
        if self.connection.waiting_for_allowance(original.task_id) is not None:
            return  # not in the broker yet: it could only refuse
        task_id = self.connection.new_task_id()
        self.duplicate = _Attempt(task_id, hedge=True)
        left = None if self.deadline is None else max(0.001, self.deadline - now)
        self.state.count("sent", original.task_id)
        self._submit(task_id, hedge_header(self.call, self.kind, original.task_id, left))

    def _timed_out(self) -> TaskTimeout:
        task_id = self.original.task_id
        waiting = self.connection.waiting_for_allowance(task_id)
        if waiting is None:
            return timeout_error(self.call)
        error: TaskTimeout = allowance_timeout(waiting, self.connection.allowance_advice())(self.call)
        return error

    def close(self) -> None:
        """The caller is done (or gone): cancel whatever still runs."""
        self.hedge_at = None
        for attempt in (self.original, self.duplicate):
            if attempt is not None and attempt.running:
                attempt.running = False
                self.connection.cancel(attempt.task_id)

    # ------------------------------------------------------------------ replies

    def _attempt(self, task_id: bytes) -> _Attempt | None:
        if task_id == self.original.task_id:
            return self.original
        duplicate = self.duplicate
        return duplicate if duplicate is not None and task_id == duplicate.task_id else None

    def _other(self, attempt: _Attempt) -> _Attempt | None:
        return self.duplicate if attempt is self.original else self.original

    def _racing(self) -> bool:
        """Whether another attempt may still win: events must be held."""
        return self.hedge_at is not None or (self.duplicate is not None and self.duplicate.running
                                             and self.original.running)

    def step(self, event: Event) -> list[Step]:
        """What a reply means to the caller, as :func:`~pool.client.one_task.single_step` says
        (several steps when held events are replayed at once; none for a loser's reply)."""
        attempt = self._attempt(event.task_id)
        if attempt is None or not attempt.running:
            return []  # a late reply of a task given up on
        winner = self.winner
        if winner is not None:
            if attempt is not winner:
                return []
            step = single_step(event, self.call, self.kind)
            if step is None:
                return []
            if step[0] and event.kind != "chunk":
                attempt.running = False
            return [step]
        if event.kind == "event":
            return self._event(attempt, event.data)
        if event.kind == "error" and event.code in ATTEMPT_FAILURES:
            other = self._other(attempt)
            if other is not None and other.running:
                return self._attempt_failed(attempt, event)
            if not attempt.hedge and self.hedge_at is not None:
                self.hedge_at = None  # the call is over: nothing to hedge
            if attempt.hedge and self.failure is not None:
                attempt.running = False  # the original's error says more than the duplicate's
                self.state.count("refused" if event.code == P.E_NO_HEDGE else "lost", self.original.task_id)
                return [(True, outcome_of(self.failure, self.call.trust_workers))]
        step = single_step(event, self.call, self.kind)
        if step is None:
            return []
        return self._won(attempt, event, step)

    def _event(self, attempt: _Attempt, data: bytes) -> list[Step]:
        if self.call.relay is None:
            return []
        if not self._racing():  # what was held while it was (a hedge not sent after all) goes first
            held, attempt.held = attempt.held, []
            return [*((None, earlier) for earlier in held), (None, data)]
        if _is_token(data, self.call.trust_workers):
            return self._won(attempt, None, (None, data))
        attempt.held.append(data)
        return []

    def _attempt_failed(self, attempt: _Attempt, event: Event) -> list[Step]:
        """One attempt failed for the pool's reasons while the other goes on: only it ends."""
        attempt.running = False
        attempt.held.clear()
        if attempt.hedge:
            self.state.count("refused" if event.code == P.E_NO_HEDGE else "lost", self.original.task_id)
            self.duplicate = None
        else:
            self.failure = event
            self.hedge_at = None
        left = self.original if attempt.hedge else self.duplicate
        assert left is not None
        held, left.held = left.held, []
        return [(None, data) for data in held]  # the one left races no one: its events go now

    def _won(self, attempt: _Attempt, event: Event | None, step: Step) -> list[Step]:
        """``attempt`` produced the first output: the other is cancelled, its events dropped."""
        self.winner = attempt
        self.hedge_at = None
        if step[0] is not True or not isinstance(step[1], BaseException):
            self.state.observe(time.monotonic() - self.started)
        other = self._other(attempt)
        if other is not None:
            if self.duplicate is not None:
                self.state.count("won" if attempt.hedge else "lost", self.original.task_id)
            other.held.clear()
            if other.running:
                other.running = False
                self.connection.cancel(other.task_id)
        if event is not None and step[0] and event.kind != "chunk":
            attempt.running = False
        held, attempt.held = attempt.held, []
        return [*((None, data) for data in held), step]


def _is_token(data: bytes, trusted: bool) -> bool:
    try:
        event = decode_output(data, trusted)
    except Exception:  # noqa: BLE001 - an event that cannot be decoded is not output; the relay skips it
        return False
    return isinstance(event, dict) and event.get("method") == TOKEN_EVENT
