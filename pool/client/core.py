"""Every rule of the client's connection to a broker, without a socket, a clock or a thread.

:class:`ClientCore` holds what this client has in flight and decides what happens to it. Its
inputs are plain method calls, each given the time (``now``, monotonic seconds): a caller submits
or cancels a task (:meth:`~ClientCore.submit`, :meth:`~ClientCore.cancel`), a message arrives
from the broker (:meth:`~ClientCore.on_message`, the frames as read), the socket's monitor saw the
handshake succeed or fail or the connection drop (:meth:`~ClientCore.on_connected`,
:meth:`~ClientCore.on_handshake_failed`, :meth:`~ClientCore.on_disconnected`), a deadline passed
(:meth:`~ClientCore.tick`). Its outputs are calls to what it was given: ``send(frames)`` for a
message to the broker, ``sink.deliver(reply)`` for a :class:`Reply` to the caller whose
submission named that sink, and three signals for the shell (``wake``: a deadline came nearer;
``settled`` / ``unsettled``: whether callers waiting for the broker have an answer). The shell,
``pool.client.connection``, owns the socket and the thread and only translates; a test drives
this class with chosen times and recording callables (tests/test_client_core.py), so a rule about
a 30 s connect timeout is checked in microseconds.

Why calls and not returned effect objects: a reply is the one allocation a message needs; an
effect record around it, and a list to return it in, would add two more on every message of the
hot path. The recording callables of the tests build those records instead.

Broker loss. Each task in flight is kept whole (:class:`Submission`: header, digest, runnable
bytes, input, sink), so that it can be sent again. When the broker is lost, a task is *held* if its
header's ``retries`` is 1 or more and nothing of it has reached its caller yet (no stream chunk, no
batch item): once a broker answers HELLO again it is resubmitted there with ``retries`` one less,
its ``timeout`` reduced by the time already spent, the runnable's bytes included (a new broker has
no runnable store) and a new wire task id (so that a late reply of the first run, from a worker that
re-registers with the new broker, is never taken for it; the caller keeps seeing its own id). If no
broker answers within the connection's connect timeout, or the call's own timeout passes first, it
fails as before (``PoolUnavailable`` or ``TaskTimeout``). Meanwhile a peer that closes the
connection during the handshake is taken for a relay with no broker behind it (the ``k8s://``
port-forward between two broker Pods), not for a refusal of this client's keys, once a broker has
welcomed these keys on this connection. The others fail at once with ``PoolUnavailable`` saying
why: with ``retries=0`` that the broker was lost while the call was in flight and that
``retries=1`` would resubmit it; a stream that had yielded chunks, or a batch task that had
reported items, that running it again would repeat them. A task submitted while the connection is
re-establishing waits for the broker the same way (it has not been sent anywhere).

This is at-least-once for calls with retries, as the broker's own retry after a lost worker already
is: a task that a worker finished but whose RESULT was lost with the broker runs again; and its
first run may still be going on a worker when the second starts.

Backpressure. The broker holds at most an allowance of task input per client key (its
``--client-queue-bytes``). A task that does not fit it *now* is answered ``E_BUSY``: it was not
taken, so it is kept here and sent again (same wire id) once one of this connection's own tasks
has finished, or, with none in flight, after a short back-off that grows up to
``BUSY_BACKOFF_MAX``. When WELCOME names the allowance, sends are also windowed by it (the bytes of
this connection's tasks in the broker), so that busy round trips are rare and a large input is not
sent only to be dropped. A task waiting here is *waiting*: its caller's timeout and cancellation
drop it locally, the broker never heard of it. Waiting tasks go out oldest first. ``E_BUSY`` never
reaches a caller; ``E_QUEUE_FULL`` (a task that can never fit, or a client past a limit) does, as
``PoolOverloaded``.

Another release. A broker of another protocol version answers in its own version (an
``incompatible`` ERROR whose first frame is, say, ``RK8S/1``): every call then fails with
``IncompatibleWorker`` naming both versions and what to upgrade, instead of waiting for a WELCOME
that will never come.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pool.client.sinks import Sink, one_wakeup
from pool.errors import AuthenticationFailed, IncompatibleWorker, PayloadTooLarge, PoolUnavailable, RunnableK8sError
from worker import defaults
from worker import protocol as P

log = logging.getLogger("runnable_k8s.client")

# A task the broker answered E_BUSY while none of this connection's tasks is in flight (so no
# finish will make room) is sent again after this back-off, doubled each time up to the max.
BUSY_BACKOFF_MIN = 0.05
BUSY_BACKOFF_MAX = 1.0
# What WELCOME names the byte allowances under, with the broker options that set them: one client
# key's tasks together, and all clients' (a task never holds more than the smaller).
ALLOWANCE_BYTES_KEYS = ("client_queue_bytes", "queue_bytes")
_ALLOWANCE_OPTIONS = {"client_queue_bytes": "--client-queue-bytes", "queue_bytes": "--queue-bytes"}


@dataclass(slots=True)
class Reply:
    """What the pool said about a task, as its caller's sink receives it: a stream chunk, a
    relayed callback event, its result, or an error code (the broker's, a worker's, or this
    client's own, such as a lost broker). ``task_id`` is the caller's id for the task."""

    task_id: bytes
    kind: str  # "chunk" | "event" (a relayed callback) | "result" | "error"
    data: bytes = b""
    code: bytes = b""
    message: str = ""


@dataclass(slots=True)
class Submission:
    """A task in flight, with everything it takes to send it again after a broker loss.

    ``task_id`` is the caller's name for the task (its replies carry it); ``wire_id`` is the id it
    has on the wire now, a new one each time it is resubmitted. ``delivered``: a chunk (or batch
    item) reached the caller, so it must not run again whole. ``hold_until``: while set, the task
    waits for a broker to say WELCOME and fails at that time (monotonic) if none does; ``held_why``
    says what happened to the broker it was in flight on. ``patience``: how long the caller waits
    for a broker when the task is held (its ``connect_timeout``; None: the connection's).
    ``sent_at``: when the header's relative ``timeout`` was last true (it is cut to what is left
    when the task goes out later). ``waiting``: kept here for the client key's allowance (not in
    the broker), ``busy_why`` the broker's word on why; ``counted``: its bytes in the window while
    it is on its way to or in the broker."""

    task_id: bytes
    header: bytes
    digest: str
    runnable: bytes
    input: bytes
    sink: Any
    wire_id: bytes = b""
    delivered: bool = False
    sent: bool = False  # went to a broker at least once (a resubmission then gets a new wire id)
    sent_at: float = 0.0
    hold_until: float | None = None
    held_why: str = ""
    patience: float | None = None
    waiting: bool = False
    busy_why: str = ""
    counted: int = 0
    seq: int = 0  # the order it came in: waiting tasks go out oldest first
    with_runnable: bool = False  # send the runnable's bytes with it next time (a new broker)

    def wire_size(self) -> int:
        """What the broker counts against the client's allowance: header and input."""
        return len(self.header) + len(self.input)


def _nothing() -> None:
    pass


class ClientCore:
    """The state and rules of one connection to a broker (see the module's docstring).

    Not thread-safe: the shell calls it under one lock. ``send`` takes a message's frames;
    ``wake`` is called when a deadline came nearer than the shell may be sleeping for (a task
    held while not connected, a busy back-off); ``settled`` when a connection attempt has an
    outcome (WELCOME, or a refusal in :attr:`failure`), ``unsettled`` when the broker is lost and
    callers must wait for the next one. ``id_prefix`` makes task ids unique across connections
    and processes (random by default)."""

    def __init__(self, address: str, connect_timeout: float, *, send: Callable[[list[bytes]], None],
                 now: float, wake: Callable[[], None] = _nothing, settled: Callable[[], None] = _nothing,
                 unsettled: Callable[[], None] = _nothing, id_prefix: bytes | None = None,
                 strict: bool = False) -> None:
        self.address = address
        # A rule that raises: raised out of on_message (tests), else logged as this client's bug
        # with its traceback (production). Input that cannot be decoded is neither: it is dropped.
        self.strict = strict
        self.connect_timeout = connect_timeout
        self._send = send
        self._wake = wake
        self._settled = settled
        self._unsettled = unsettled
        self.ready = False  # the broker has welcomed this connection and not been lost since
        self.failure: BaseException | None = None  # why the last connection attempt was refused
        # A broker has welcomed this connection (so its keys were accepted), and the handshakes
        # a peer closed since the last WELCOME (see on_handshake_failed).
        self.welcomed = False
        self.dropped_handshakes = 0
        self._allowance: tuple[int, str] | None = None  # set with broker_info
        self.broker_info = {}
        # Workers taking tasks, as last heard (WELCOME, then STATUS): sizes batches' sub-batches.
        self.workers = 1
        self._workers_heard = float("-inf")  # never yet (WELCOME tells)
        self._workers_asked = False
        # Task ids: unique per connection, random across connections and processes.
        self._id_prefix = os.urandom(P.TASK_ID_BYTES - 8) if id_prefix is None else id_prefix
        self._ids = itertools.count()
        self._pending: dict[bytes, Submission] = {}  # by wire id
        self._wire_ids: dict[bytes, bytes] = {}  # caller's task id -> wire id, for resubmitted tasks only
        self._hold_deadline: float | None = None  # the soonest hold_until of a held task
        # Who asked for a STATUS, in order; None: the core itself, for the worker count.
        self._status_waiters: collections.deque[Sink | None] = collections.deque()
        self._sent_digests: set[str] = set()
        # Backpressure: tasks waiting for the allowance (a heap by seq; a task dropped meanwhile
        # stays in it with waiting False and is skipped), and what is counted as in the broker.
        self._waiting: list[tuple[int, Submission]] = []
        self._waiting_count = 0
        self._window_bytes = 0
        self._window_tasks = 0
        self._seq = itertools.count()
        self._retry_at: float | None = None
        self._backoff = BUSY_BACKOFF_MIN
        self._incompatible_logged = False
        self._last_seen = now
        self._next_beat = 0.0  # the first tick says HELLO at once

    # ------------------------------------------------------------------ what callers read

    @property
    def broker_info(self) -> dict[str, Any]:
        """What the broker said at WELCOME (its limits, allowances and worker count)."""
        return self._broker_info

    @broker_info.setter
    def broker_info(self, info: dict[str, Any]) -> None:
        # The allowance is read here, once per WELCOME: every submission and every finish asks for it.
        self._broker_info = info
        named = [(value, _ALLOWANCE_OPTIONS[key]) for key in ALLOWANCE_BYTES_KEYS if (value := _count(info.get(key)))]
        self._allowance = min(named) if named else None

    def client_allowance(self) -> int | None:
        """The bytes of task input the broker holds at most for this client key, when its WELCOME
        says (None: unknown, a broker that does not say)."""
        limit = self._allowance
        return None if limit is None else limit[0]

    def allowance_advice(self) -> str:
        """How a user gives this client more room in the broker (for messages)."""
        limit = self.client_allowance()
        now = f" (now {limit} bytes)" if limit is not None else ""
        return (f"raise the broker's --client-queue-bytes{now} or --client-queue-size (the chart's broker "
                "settings), send fewer or smaller calls at once (max_concurrency), or raise timeout= on RunnableK8s")

    def check_size(self, runnable: bytes, input_blob: bytes) -> None:
        """Raise ``PayloadTooLarge`` for a task over the broker's message limit (it would be dropped)."""
        limit = int(self._broker_info.get("max_message_bytes", defaults.MAX_MESSAGE_BYTES))
        size = len(runnable) + len(input_blob)
        if size > limit:
            raise PayloadTooLarge(
                f"the runnable and input come to {size} bytes, over the broker's limit of {limit}. "
                "Send less data (pass a reference such as a URL instead), or raise the broker's "
                "--max-message-bytes."
            )

    def new_task_id(self) -> bytes:
        return self._id_prefix + next(self._ids).to_bytes(8, "big")

    @property
    def waiting_count(self) -> int:
        """Tasks kept here for this client's allowance in the broker (not sent, or answered busy)."""
        return self._waiting_count

    @property
    def held_count(self) -> int:
        """Tasks waiting for a broker to say WELCOME (after a loss, or submitted before one did)."""
        return sum(1 for s in self._pending.values() if s.hold_until is not None)

    @property
    def pending_count(self) -> int:
        """Tasks this client has not had the last reply of yet (in the broker, held or waiting)."""
        return len(self._pending)

    def waiting_for_allowance(self, task_id: bytes) -> str | None:
        """Why the task waits here for the broker's allowance (the broker's own words when it
        answered busy), or None when it is not waiting."""
        submission = self._pending.get(self._wire_ids.get(task_id, task_id))
        if submission is None or not submission.waiting:
            return None
        return submission.busy_why or "this client's tasks fill its allowance in the broker"

    def dropped_why(self) -> str:
        """What to add to a message about a broker that did not answer: the handshakes a peer
        closed meanwhile, if any."""
        if not self.dropped_handshakes:
            return ""
        return (f"; the peer there closed {self.dropped_handshakes} connection attempts during the handshake "
                "(a relay such as a k8s:// port-forward with no ready broker Pod behind it, or a broker that "
                "no longer accepts this client's CurveZMQ keys)")

    @property
    def next_deadline(self) -> float:
        """When :meth:`tick` has something to do next (the next heartbeat at the latest)."""
        wake_at = self._next_beat
        hold, retry = self._hold_deadline, self._retry_at
        if hold is not None and hold < wake_at:
            wake_at = hold
        if retry is not None and retry < wake_at:
            wake_at = retry
        return wake_at

    # ------------------------------------------------------------------ from callers

    def submit(self, submission: Submission, now: float) -> None:
        """Take a caller's task: send it, or keep it (waiting for the allowance, or for a broker),
        or refuse it at once through its sink."""
        if self.failure is not None and not self.ready:
            submission.sink.deliver(Reply(submission.task_id, "error", code=_failure_code(self.failure),
                                          message=str(self.failure)))
            return
        refusal = self._never_fits(submission)
        if refusal is not None:
            submission.sink.deliver(Reply(submission.task_id, "error", code=P.E_QUEUE_FULL, message=refusal))
            return
        submission.wire_id = submission.wire_id or submission.task_id
        submission.sent_at = now
        submission.seq = next(self._seq)
        self._pending[submission.wire_id] = submission
        if not self.ready:  # the broker is being reached again: wait for it, unsent
            self._hold(submission, now, "")
            self._wake()  # the shell watches the hold's deadline
            return
        self._offer(submission, now)

    def cancel(self, task_id: bytes, now: float) -> bool:
        """Stop a task: the broker is told only if it has the task (one held for a broker, or
        waiting for the allowance, is simply forgotten here). True if a message was sent."""
        wire_id = self._wire_ids.pop(task_id, task_id)
        submission = self._pending.get(wire_id)
        if submission is None:
            return False
        in_broker = submission.hold_until is None and not submission.waiting
        freed = self._drop(wire_id, submission)
        if not in_broker:
            return False
        self._send([P.PROTOCOL, P.CANCEL, wire_id])
        self._made_room(freed, now)
        return True

    def request_status(self, sink: Sink) -> None:
        """Ask the broker for its STATUS; the answer (or ``{"error": why}``) goes to ``sink``."""
        self._status_waiters.append(sink)
        self._send([P.PROTOCOL, P.STATUS])

    def workers_stale(self, now: float) -> bool:
        """Whether the worker count is older than ``POOL_SIZE_MAX_AGE`` and nobody asked yet."""
        return not self._workers_asked and now - self._workers_heard > defaults.POOL_SIZE_MAX_AGE

    def ask_workers(self) -> bool:
        """Ask the broker for a STATUS to refresh the worker count (once at a time); True if sent."""
        if not self.ready or self._workers_asked:
            return False
        self._workers_asked = True
        self._status_waiters.append(None)
        self._send([P.PROTOCOL, P.STATUS])
        return True

    def heard_status(self, status: Any, now: float) -> None:
        """A STATUS answer (or an error in its place): what it says of the workers is news."""
        workers = status.get("workers") if isinstance(status, dict) else None
        count = sum(1 for w in workers if isinstance(w, dict) and not w.get("draining")) \
            if isinstance(workers, list) else None
        self._heard_workers(count, now)

    def _heard_workers(self, count: int | None, now: float) -> None:
        if count is not None:
            self.workers = count
        self._workers_heard = now
        self._workers_asked = False

    # ------------------------------------------------------------------ from the socket's monitor

    def on_connected(self) -> None:
        """A handshake succeeded (a broker, or something in front of one): say HELLO."""
        self._hello()

    def on_handshake_failed(self, peer_closed: bool, now: float) -> None:
        """A handshake failed: the peer closed the connection during it (``peer_closed``), or
        refused this client's keys or protocol outright."""
        if peer_closed and self.welcomed:
            # A broker refusing a key closes the connection during the handshake, and so does a
            # relay with no broker behind it: the k8s:// port-forward while the old broker Pod is
            # gone and the new one not ready, a load balancer with no backend. This connection was
            # welcomed with these keys before, so it is taken for the relay: the held calls wait
            # for the next broker for as long as their patience (a broker that really refuses the
            # keys now fails them then, saying so).
            self.dropped_handshakes += 1
            if self.dropped_handshakes == 1:
                log.info("the peer at %s closed the connection during the handshake; waiting for a "
                         "broker to answer", self.address)
            return
        self.failure = AuthenticationFailed(
            f"the broker at {self.address} refused this client's CurveZMQ handshake. Check "
            "that the client's public key is in the broker's clients/ allow-list and that "
            "the client uses its own folder of `runnable-k8s keys DIR` (DIR/clients/NAME); "
            "a broker with keys also refuses clients without them."
        )
        self._fail_all(AuthenticationFailed, str(self.failure), now)
        self._settled()

    def on_disconnected(self, now: float) -> None:
        """The connection to the broker dropped."""
        if self.ready:
            self._lost(f"the connection to the broker at {self.address} dropped", now)

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> bool:
        """Do what is due at ``now``: fail held tasks whose patience ran out, send again what the
        busy back-off kept, heartbeat (or say HELLO while not welcomed) and notice a silent
        broker. True if anything was due (the shell then reads what may have arrived)."""
        due = False
        if self._hold_deadline is not None and now >= self._hold_deadline:
            due = True
            self._expire_held(now)
        if self._retry_at is not None and now >= self._retry_at:
            due = True
            self._retry_at = None
            if self.ready:
                self._pump(now)
        if now >= self._next_beat:
            due = True
            self._next_beat = now + P.HEARTBEAT_INTERVAL
            if self.ready:
                self._send([P.PROTOCOL, P.HEARTBEAT])
                if now - self._last_seen > P.HEARTBEAT_EXPIRY:
                    self._lost(f"the broker at {self.address} stopped answering heartbeats", now)
            else:
                self._hello()
        return due

    # ------------------------------------------------------------------ the end

    def close(self, now: float) -> None:
        """The shell is closing: say BYE and fail whatever is still in flight."""
        self._send([P.PROTOCOL, P.BYE])
        self.fail(PoolUnavailable, "the connection was closed", now)

    def fail(self, error: type[RunnableK8sError], message: str, now: float) -> None:
        """This connection is over: every task in flight fails with ``error``."""
        self._fail_all(error, message, now)
        self.ready = False

    # ------------------------------------------------------------------ from the broker

    def on_message(self, frames: list[bytes], now: float) -> None:
        """One message from the broker, its frames as read. A message that cannot be decoded is
        logged and dropped: it must not break the caller that happened to read it. A rule that
        raises on a decoded message is a bug here, not a bad broker: logged as one, or raised when
        ``strict``."""
        self._last_seen = now
        try:
            info = (P.decode_json_object(frames[2]) if len(frames) >= 3 and frames[0] == P.PROTOCOL
                    and frames[1] in _JSON_COMMANDS else None)
        except (ValueError, RecursionError):
            log.warning("ignored a %s from the broker that is not a JSON object",
                        P.COMMAND_NAMES.get(frames[1], frames[1]))
            return
        try:
            if frames[0] != P.PROTOCOL or len(frames) < 2:
                if frames[0] != P.PROTOCOL and frames[0].startswith(P.PROTOCOL_FAMILY):
                    self._on_foreign_protocol(frames, now)
                else:
                    log.warning("ignored a malformed message from the broker")
                return
            command = frames[1]
            count = len(frames)
            if command == P.CHUNK and count == 4:
                self._on_chunk(frames[2], frames[3])
            elif command == P.RESULT and count == 4:
                self._on_result(frames[2], frames[3], now)
            elif command == P.REPLIES and count == 3:
                self._on_replies(frames[2], now)
            elif command == P.EVENT and count == 4:
                self._on_event(frames[2], frames[3])
            elif command == P.ERROR and count >= 5:
                self._on_error(frames[2], frames[3], frames[4].decode("utf-8", "replace"),
                               frames[5] if count > 5 else b"", now)
            elif command == P.WELCOME and info is not None:
                self._on_welcome(info, now)
            elif command == P.STATUS and info is not None:
                if self._status_waiters:
                    waiter = self._status_waiters.popleft()
                    if waiter is None:
                        self.heard_status(info, now)
                    else:
                        waiter.deliver(info)
            elif command == P.RECONNECT:  # a broker that does not know this client: a new one
                self._lost(f"the broker at {self.address} restarted (it no longer knew this client)", now)
                self._hello()
            elif command != P.HEARTBEAT:
                log.warning("ignored an unexpected %s from the broker", P.COMMAND_NAMES.get(command, command))
        except Exception:
            if self.strict:
                raise
            log.error("a client rule failed on a %s from the broker (a bug in runnable-k8s; the message "
                      "was dropped)", P.COMMAND_NAMES.get(frames[1], frames[1]), exc_info=True)

    def _on_chunk(self, task_id: bytes, data: bytes) -> None:
        submission = self._pending.get(task_id)
        if submission is not None and submission.hold_until is None:
            submission.delivered = True
            submission.sink.deliver(Reply(submission.task_id, "chunk", data))

    def _on_event(self, task_id: bytes, data: bytes) -> None:
        # A relayed callback: not "delivered" output, so a call that reported only callbacks
        # may still be resubmitted after a broker loss (its handlers then see a new attempt).
        submission = self._pending.get(task_id)
        if submission is not None and submission.hold_until is None:
            submission.sink.deliver(Reply(submission.task_id, "event", data))

    def _on_result(self, task_id: bytes, data: bytes, now: float) -> None:
        submission = self._pending.get(task_id)
        if submission is not None and submission.hold_until is None and not submission.waiting:
            freed = self._drop(task_id, submission)
            submission.sink.deliver(Reply(submission.task_id, "result", data))
            self._made_room(freed, now)

    def _on_replies(self, packed: bytes, now: float) -> None:
        """Several replies in one message (``worker.protocol``, REPLIES): each entry goes to its
        submission's sink exactly as its CHUNK, EVENT or RESULT would, in order, and the replies
        for one event loop wake it once. A malformed pack is dropped whole (none of it is trusted)."""
        try:
            entries = P.unpack_replies(packed)
        except ValueError as exc:
            log.warning("ignored a malformed REPLIES from the broker: %s", exc)
            return
        with one_wakeup():
            for kind, task_id, data in entries:
                if kind == P.CHUNK:
                    self._on_chunk(task_id, data)
                elif kind == P.RESULT:
                    self._on_result(task_id, data, now)
                else:
                    self._on_event(task_id, data)

    def _on_welcome(self, info: dict[str, Any], now: float) -> None:
        self.broker_info = info
        self._heard_workers(_count(info.get("workers")), now)
        self.failure = None
        self.welcomed = True
        self.dropped_handshakes = 0
        self.ready = True
        self._settled()
        if self._hold_deadline is not None:
            self._resubmit_held(now)

    def _on_error(self, task_id: bytes, code: bytes, message: str, detail: bytes, now: float) -> None:
        if not task_id:  # about the connection, not a task
            if code == P.E_INCOMPATIBLE:
                self.failure = IncompatibleWorker(f"the broker at {self.address} refused this client: {message}")
                self._fail_all(IncompatibleWorker, str(self.failure), now)
                self._settled()
            elif code == P.E_UNAUTHORIZED:  # a key the broker knows, but not as a client's (or revoked)
                self.failure = AuthenticationFailed(f"the broker at {self.address} refused this client: {message}")
                self._fail_all(AuthenticationFailed, str(self.failure), now)
                self._settled()
            log.error("broker: %s", message)
            return
        submission = self._pending.get(task_id)
        if submission is None or submission.hold_until is not None or submission.waiting:
            return  # a late answer about a task given up on, or about its wire id before a loss
        if code == P.E_BUSY:
            self._busy(submission, message, now)
        elif code == P.E_NEED_RUNNABLE:
            self._send_submission(submission, with_runnable=True)
        elif code == P.E_HELLO_REQUIRED:
            # This task was refused, not run: it waits for the broker as it is. The others in
            # flight were sent to a broker that is gone (or that forgot this client).
            self._hold(submission, now, "")
            self._lost(f"the broker at {self.address} restarted (it no longer knew this client)", now)
            self._hello()
        else:
            freed = self._drop(task_id, submission)
            submission.sink.deliver(Reply(submission.task_id, "error", detail, code, message))
            self._made_room(freed, now)

    def _on_foreign_protocol(self, frames: list[bytes], now: float) -> None:
        """A broker of another release answered (in its own protocol version, which is all it
        can do): nothing will ever be welcomed here, so every call fails now, saying what to
        upgrade. A broker upgraded later is welcomed as usual (HELLO goes on every second)."""
        theirs = frames[0].decode("ascii", "replace")
        said = frames[4].decode("utf-8", "replace") if len(frames) > 4 and frames[1] == P.ERROR else ""
        try:
            older = int(theirs[len(P.PROTOCOL_FAMILY):]) < P.PROTOCOL_VERSION
        except ValueError:
            older = True
        ours = P.PROTOCOL.decode()
        if older:
            advice = ("the pool runs an older runnable-k8s release than this client. Upgrade the pool first: "
                      "`helm upgrade` the runnable-k8s chart to this client's release (or restart `runnable-k8s "
                      "broker` and its workers from it), then the other clients (`pip install -U runnable-k8s`)")
        else:
            advice = ("this client is older than the pool. Upgrade it (`pip install -U runnable-k8s`, the pool's "
                      "release)")
        self.failure = IncompatibleWorker(
            f"the broker at {self.address} speaks protocol {theirs} but this client speaks {ours}: {advice}"
            + (f". The broker said: {said}" if said else ""))
        if not self._incompatible_logged:
            self._incompatible_logged = True
            log.error("%s", self.failure)
        self._fail_all(IncompatibleWorker, str(self.failure), now)
        self._settled()

    def _hello(self) -> None:
        # "replies": this client reads REPLIES, so the broker may send it replies packed together.
        self._send([P.PROTOCOL, P.HELLO, P.encode_json({**P.environment(), "replies": True})])

    # ------------------------------------------------------------------ sending

    def _send_submission(self, submission: Submission, with_runnable: bool = False) -> None:
        first_time = submission.digest not in self._sent_digests
        blob = submission.runnable if (first_time or with_runnable) else b""
        self._sent_digests.add(submission.digest)
        submission.sent = True
        self._send([P.PROTOCOL, P.SUBMIT, submission.wire_id, submission.header, blob, submission.input])

    # ------------------------------------------------------------------ the allowance

    def _never_fits(self, submission: Submission) -> str | None:
        """Why the broker could never take this task (more input than the whole allowance WELCOME
        named), or None: refused here rather than sent only to be refused."""
        allowance = self._allowance
        if allowance is None:
            return None
        size = submission.wire_size()
        if size <= allowance[0]:
            return None
        limit, option = allowance
        return (f"this task holds {size} bytes of input, more than this client's whole allowance in the broker "
                f"({option} {limit}), so the broker could never take it; raise the broker's {option} (the "
                "chart's broker settings), or send less data (a reference such as a URL instead of the content)")

    def _offer(self, submission: Submission, now: float) -> None:
        """Send a task now if the allowance has room and none waits before it; else it waits."""
        if not self._waiting_count and self._fits(submission.wire_size(), None):
            self._send_counted(submission, now)
            return
        self._wait(submission)
        if not self._window_tasks and self._retry_at is None:  # nothing will make room: go now
            self._pump(now)

    def _fits(self, size: int, credit: int | None) -> bool:
        """Whether a task of ``size`` may go: always when nothing is in flight (the broker then
        takes it, or says it can never fit); else within the allowance WELCOME named, or, not
        knowing it, while ``credit`` (bytes just freed) lasts (None: no busy answer seen)."""
        if not self._window_tasks:
            return True
        allowance = self._allowance
        if allowance is not None:
            return self._window_bytes + size <= allowance[0]
        return credit is None or credit > 0

    def _wait(self, submission: Submission) -> None:
        submission.waiting = True
        self._waiting_count += 1
        heapq.heappush(self._waiting, (submission.seq, submission))  # seq is unique: never compares tasks

    def _pump(self, now: float, freed: int = 0) -> None:
        """Send the oldest waiting tasks while the window has room (after a finish freed
        ``freed`` bytes, or the back-off passed)."""
        credit = freed
        waiting = self._waiting
        while waiting:
            submission = waiting[0][1]
            if not submission.waiting:  # cancelled or failed meanwhile
                heapq.heappop(waiting)
                continue
            size = submission.wire_size()
            if not self._fits(size, credit):
                break
            heapq.heappop(waiting)
            submission.waiting = False
            self._waiting_count -= 1
            credit -= size
            self._send_counted(submission, now)
        if self._window_tasks or not self._waiting_count:
            self._retry_at = None

    def _send_counted(self, submission: Submission, now: float) -> None:
        """Send a task, its relative timeout cut to what is left, and count it in the window."""
        if now - submission.sent_at > 0.01:
            header = P.TaskHeader.from_bytes(submission.header)
            if header.timeout is not None:
                header.timeout = max(0.001, header.timeout - (now - submission.sent_at))
                submission.header = header.to_bytes()
            submission.sent_at = now
        submission.counted = submission.wire_size()
        self._window_bytes += submission.counted
        self._window_tasks += 1
        self._send_submission(submission, with_runnable=submission.with_runnable)
        submission.with_runnable = False

    def _uncount(self, submission: Submission) -> int:
        freed = submission.counted
        if freed:
            self._window_bytes -= freed
            self._window_tasks -= 1
            submission.counted = 0
        return freed

    def _made_room(self, freed: int, now: float) -> None:
        """One of this connection's tasks left the broker: the waiting ones may go."""
        if freed:
            self._backoff = BUSY_BACKOFF_MIN
        if self._waiting_count and self.ready:
            self._pump(now, freed)

    def _busy(self, submission: Submission, why: str, now: float) -> None:
        """The broker did not take the task (the allowance is full now): keep it for later."""
        self._uncount(submission)
        submission.busy_why = why
        self._wait(submission)
        if not self._window_tasks and self._retry_at is None:
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, BUSY_BACKOFF_MAX)
            self._wake()  # the shell sleeps until the retry

    # ------------------------------------------------------------------ broker loss

    def _lost(self, why: str, now: float) -> None:
        """The broker is gone (or no longer knows this client): hold what may be resubmitted,
        fail the rest, and wait for a broker to answer HELLO."""
        self.ready = False
        self._unsettled()
        self._sent_digests.clear()
        held = failed = 0
        self._waiting.clear()
        self._waiting_count = self._window_bytes = self._window_tasks = 0
        self._retry_at = None
        for wire_id, submission in list(self._pending.items()):
            submission.counted = 0  # the window starts empty with the next broker
            if submission.hold_until is not None:
                continue  # already waiting for a broker
            if submission.waiting:  # never taken by the broker: it waits for the next one as it is
                submission.waiting = False
                self._hold(submission, now, "")
                held += 1
                continue
            refusal = self._resubmittable(submission, why, now)
            if refusal is None:
                held += 1
                continue
            failed += 1
            self._drop(wire_id, submission)
            submission.sink.deliver(Reply(submission.task_id, "error", code=P.E_POOL_UNAVAILABLE, message=refusal))
        self._answer_status_waiters(why, now)
        log.warning("%s; of the calls in flight, %d wait to be resubmitted and %d failed with PoolUnavailable",
                    why, held, failed)

    def _resubmittable(self, submission: Submission, why: str, now: float) -> str | None:
        """Hold ``submission`` for the next broker with one retry less and return None, or say
        why it cannot be run again."""
        try:
            header = P.TaskHeader.from_bytes(submission.header)
        except ValueError:  # never sent by this client's own code; nothing to resubmit
            return f"lost the broker connection ({why}) while the call was in flight"
        if submission.delivered:
            what = "reported some of its batch items" if header.kind == "batch" else "yielded chunks"
            return (f"lost the broker connection ({why}) while the call was in flight; it had already "
                    f"{what}, so it is not resubmitted (running it again would repeat them); retry the "
                    "call if that is safe")
        if header.retries < 1:
            return (f"lost the broker connection ({why}) while the call was in flight; it was not "
                    "resubmitted because it has retries=0: with retries=1 (RunnableK8s(..., retries=1)) "
                    "it would be resubmitted to the next broker this client reaches")
        header.retries -= 1
        submission.header = header.to_bytes()
        self._hold(submission, now, why)
        return None

    def _hold(self, submission: Submission, now: float, why: str) -> None:
        submission.hold_until = until = now + self._patience(submission)
        submission.held_why = why
        if self._hold_deadline is None or until < self._hold_deadline:
            self._hold_deadline = until

    def _patience(self, submission: Submission) -> float:
        return self.connect_timeout if submission.patience is None else submission.patience

    def _expire_held(self, now: float) -> None:
        """Fail the held tasks whose wait for a broker is over."""
        soonest: float | None = None
        for wire_id, submission in list(self._pending.items()):
            until = submission.hold_until
            if until is None:
                continue
            if until > now:
                soonest = until if soonest is None or until < soonest else soonest
                continue
            self._drop(wire_id, submission)
            lost = (f"lost the broker connection ({submission.held_why}) while the call was in flight, and "
                    if submission.held_why else "")
            submission.sink.deliver(Reply(submission.task_id, "error", code=P.E_POOL_UNAVAILABLE, message=(
                f"{lost}no runnable-k8s broker answered at {self.address} within the connect timeout of "
                f"{self._patience(submission):g}s, so the call was not {'re' if lost else ''}submitted"
                + self.dropped_why())))
        self._hold_deadline = soonest

    def _resubmit_held(self, now: float) -> None:
        """A broker said WELCOME: offer it every held task (oldest first, within the allowance),
        with its runnable (it may be a new broker, with no runnable store) and, if the task was
        sent before, a new wire id; its timeout is cut to what is left when it goes."""
        self._hold_deadline = None
        held = sorted((s for s in self._pending.values() if s.hold_until is not None), key=lambda s: s.seq)
        for submission in held:
            submission.hold_until = None
            submission.held_why = ""
            submission.with_runnable = True
            if submission.sent:
                del self._pending[submission.wire_id]
                submission.wire_id = self.new_task_id()
                self._pending[submission.wire_id] = submission
                self._wire_ids[submission.task_id] = submission.wire_id
            self._offer(submission, now)

    def _drop(self, wire_id: bytes, submission: Submission) -> int:
        """Forget a task in flight (its caller gets, or got, its last reply); return the bytes
        it freed in the window."""
        self._pending.pop(wire_id, None)
        if wire_id != submission.task_id:
            self._wire_ids.pop(submission.task_id, None)
        if submission.waiting:  # left in the heap, skipped there
            submission.waiting = False
            self._waiting_count -= 1
        return self._uncount(submission)

    def _fail_all(self, error: type[RunnableK8sError], message: str, now: float) -> None:
        code = _failure_code(error)
        for submission in list(self._pending.values()):
            submission.sink.deliver(Reply(submission.task_id, "error", code=code, message=message))
        self._pending.clear()
        self._wire_ids.clear()
        self._hold_deadline = None
        self._waiting.clear()
        self._waiting_count = self._window_bytes = self._window_tasks = 0
        self._retry_at = None
        self._answer_status_waiters(message, now)

    def _answer_status_waiters(self, why: str, now: float) -> None:
        """No STATUS answer will come from this broker: each waiter gets the reason instead."""
        waiters = self._status_waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter is None:
                self.heard_status({"error": why}, now)
            else:
                waiter.deliver({"error": why})


def _failure_code(error: BaseException | type[BaseException] | None) -> bytes:
    """The error code a call fails with when the connection itself failed with ``error``."""
    kind = error if isinstance(error, type) else type(error)
    if issubclass(kind, IncompatibleWorker):
        return P.E_INCOMPATIBLE
    if issubclass(kind, AuthenticationFailed):
        return P.E_UNAUTHORIZED
    return P.E_POOL_UNAVAILABLE


# Commands whose first body frame is a JSON object: decoded before any rule sees them.
_JSON_COMMANDS = frozenset({P.WELCOME, P.STATUS})


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
