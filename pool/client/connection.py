"""The client's one connection to a broker, shared by every RunnableK8s, thread and event loop.

One DEALER socket per process and broker, guarded by a lock: a ZeroMQ socket may be used by one
thread at a time (the lock is also the memory barrier ZeroMQ asks for when a socket changes
threads). A caller sends its own SUBMIT or CANCEL while holding the lock, with no hand-off to
another thread, and then reads whatever arrived meanwhile. Between calls the connection's I/O
thread waits on the socket's file descriptor (not on the socket itself, so it holds no lock while
it waits), reads replies and hands each task's events to the caller's *sink*: a thread-safe queue
for sync callers, or, for async callers, a per-event-loop mailbox that wakes the loop once per
batch of events, so an awaiting coroutine holds no thread. Many calls are in flight at once;
events carry the task id.

The I/O thread also says HELLO (again after a broker restart), heartbeats, and notices a lost
broker: a disconnect at once, a silent one after the heartbeat expiry, a restarted one when it
answers RECONNECT or HELLO_REQUIRED (it no longer knows this client). No call is left to hang.

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
welcomed these keys on this connection. The others fail at once with
``PoolUnavailable`` saying why: with ``retries=0`` that the broker was lost while the call was in
flight and that ``retries=1`` would resubmit it; a stream that had yielded chunks, or a batch task
that had reported items, that running it again would repeat them. A task submitted while the
connection is re-establishing waits for the broker the same way (it has not been sent anywhere).

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

import asyncio
import atexit
import collections
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from pool.errors import AuthenticationFailed, IncompatibleWorker, PayloadTooLarge, PoolUnavailable, RunnableK8sError
from worker import defaults, transport
from worker import protocol as P
from worker.curve import PeerKeys

log = logging.getLogger("runnable_k8s.client")

DEFAULT_CONNECT_TIMEOUT = defaults.CONNECT_TIMEOUT
# A task the broker answered E_BUSY while none of this connection's tasks is in flight (so no
# finish will make room) is sent again after this back-off, doubled each time up to the max.
BUSY_BACKOFF_MIN = 0.05
BUSY_BACKOFF_MAX = 1.0
# What WELCOME names the byte allowances under, with the broker options that set them: one client
# key's tasks together, and all clients' (a task never holds more than the smaller).
ALLOWANCE_BYTES_KEYS = ("client_queue_bytes", "queue_bytes")
_ALLOWANCE_OPTIONS = {"client_queue_bytes": "--client-queue-bytes", "queue_bytes": "--queue-bytes"}


@dataclass(slots=True)
class Event:
    """Something that happened to a task: a chunk, its result, or an error code from the pool."""

    task_id: bytes
    kind: str  # "chunk" | "event" (a relayed callback) | "result" | "error"
    data: bytes = b""
    code: bytes = b""
    message: str = ""


class ThreadSink:
    """Where a sync caller waits for its events."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def deliver(self, event: Any) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None) -> Any:
        """The next event; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._queue.get(timeout=timeout)


class _LoopMailbox:
    """Events for the sinks of one event loop, handed over with one wake-up per batch."""

    __slots__ = ("loop", "thread", "items", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.items: collections.deque[tuple[LoopSink, Any]] = collections.deque()
        self.scheduled = False

    def post(self, sink: LoopSink, event: Any) -> None:
        self.items.append((sink, event))
        if not self.scheduled:
            self.scheduled = True
            try:
                if threading.get_ident() == self.thread:
                    self.loop.call_soon(self.flush)
                else:
                    self.loop.call_soon_threadsafe(self.flush)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody is waiting any more

    def flush(self) -> None:
        self.scheduled = False  # before reading: a post from now on schedules another flush
        items = self.items
        while items:
            sink, event = items.popleft()
            sink._put(event)


_mailboxes = threading.local()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _LoopMailbox:
    """The mailbox of the loop running in this thread (a thread runs one loop at a time)."""
    mailbox = getattr(_mailboxes, "current", None)
    if mailbox is None or mailbox.loop is not loop:
        mailbox = _mailboxes.current = _LoopMailbox(loop)
    return mailbox


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class LoopSink:
    """Where a coroutine waits for its events without holding a thread."""

    __slots__ = ("_mailbox", "_events", "_waiter")

    def __init__(self) -> None:
        self._mailbox = _mailbox(asyncio.get_running_loop())
        self._events: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, event: Any) -> None:
        self._mailbox.post(self, event)

    def _put(self, event: Any) -> None:  # on the sink's loop
        self._events.append(event)
        if self._waiter is not None:
            _wake(self._waiter)

    async def get(self, timeout: float | None) -> Any:
        """The next event; raises ``TimeoutError`` after ``timeout`` seconds."""
        if not self._events:
            loop = self._mailbox.loop
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if not self._events:
                raise TimeoutError
        return self._events.popleft()


@dataclass(slots=True)
class Submission:
    """A task in flight, with everything it takes to send it again after a broker loss.

    ``task_id`` is the caller's name for the task (its events carry it); ``wire_id`` is the id it
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


_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


def check_plaintext(address: str, keys: PeerKeys | None, insecure: bool) -> None:
    """Refuse plaintext (no keys) to an address off this machine unless told ``insecure`` (DESIGN §5):
    loopback, ipc:// and inproc:// are always fine."""
    refusal = transport.plaintext_refusal(address, keys, insecure, "this client", "insecure=True")
    if refusal is not None:
        raise AuthenticationFailed(refusal)


class Connection:
    """Use :meth:`shared`; one instance per (process, address, keys)."""

    _registry: ClassVar[dict[tuple[int, str, Any], Connection]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _counter: ClassVar[itertools.count[int]] = itertools.count()

    @classmethod
    def shared(cls, address: str, keys: PeerKeys | None = None,
               connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, insecure: bool = False) -> Connection:
        """The process's connection to ``address``. Without ``keys`` it is plaintext, which is
        refused (``AuthenticationFailed``) for an address off this machine unless ``insecure``."""
        check_plaintext(address, keys, insecure)  # before the lookup: an insecure one may exist already
        key = (os.getpid(), address, keys)  # a forked child gets its own (zmq is not fork-safe)
        with cls._registry_lock:
            connection = cls._registry.get(key)
            if connection is None or connection.closed:
                connection = cls(address, keys, connect_timeout, insecure)
                cls._registry[key] = connection
            return connection

    @classmethod
    def close_all(cls, address: str | None = None) -> None:
        """Close shared connections (to one address, or all): stops their I/O threads."""
        with cls._registry_lock:
            victims = [k for k in cls._registry if address is None or k[1] == address]
            connections = [cls._registry.pop(k) for k in victims]
        for connection in connections:
            connection.close()

    def __init__(self, address: str, keys: PeerKeys | None, connect_timeout: float,
                 insecure: bool = False) -> None:
        check_plaintext(address, keys, insecure)
        self.address = address
        self.keys = keys
        self.connect_timeout = connect_timeout
        self.closed = False
        self._allowance: tuple[int, str] | None = None  # set with broker_info
        self.broker_info = {}
        # Workers taking tasks, as last heard (WELCOME, then STATUS): sizes batches' sub-batches.
        self._workers = 1
        self._workers_heard = 0.0
        self._workers_asked = False
        self._ready = threading.Event()
        # Set when a connection attempt has an outcome: WELCOME, or a refusal in _failure.
        self._settled = threading.Event()
        self._failure: BaseException | None = None
        # A broker has welcomed this connection (so its keys were accepted), and the handshakes
        # a peer closed since the last WELCOME (see _on_monitor).
        self._welcomed = False
        self._dropped_handshakes = 0
        # Task ids: unique per connection, random across connections and processes.
        self._id_prefix = os.urandom(P.TASK_ID_BYTES - 8)
        self._ids = itertools.count()
        # Everything below is used under _lock only: the socket and what is in flight on it.
        self._lock = threading.Lock()
        self._pending: dict[bytes, Submission] = {}  # by wire id
        self._wire_ids: dict[bytes, bytes] = {}  # caller's task id -> wire id, for resubmitted tasks only
        self._hold_deadline: float | None = None  # the soonest hold_until of a held task
        self._status_waiters: collections.deque[ThreadSink] = collections.deque()
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
        self._last_seen = time.monotonic()
        self._context = zmq.Context()
        self._sock, self._monitor = self._new_socket()
        wake_endpoint = f"inproc://rk8s-wake-{next(self._counter)}"
        self._wake_in = self._context.socket(zmq.PULL)
        self._wake_in.bind(wake_endpoint)
        self._wake_out = self._context.socket(zmq.PUSH)
        self._wake_out.linger = 0
        self._wake_out.connect(wake_endpoint)
        self._thread = threading.Thread(target=self._run, name=f"runnable-k8s-io {address}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (any thread)

    @property
    def ready(self) -> bool:
        """True while the broker has welcomed this connection and not been lost since."""
        return self._ready.is_set()

    def ensure_ready(self, timeout: float | None = None) -> None:
        """Return once the broker has said WELCOME; raise ``PoolUnavailable`` if it does not
        within ``timeout`` (default: the connection's connect timeout)."""
        if self._ready.is_set():
            return
        if self.closed:
            raise PoolUnavailable(f"the connection to {self.address} is closed")
        timeout = self.connect_timeout if timeout is None else timeout
        self._settled.wait(timeout)
        if self._ready.is_set():
            return
        if self._failure is not None:
            raise self._failure
        raise PoolUnavailable(
            f"no runnable-k8s broker answered at {self.address} within {timeout:g}s{self._dropped_why()}. "
            "Start one (`runnable-k8s local`, or the Helm chart), check the address, or use "
            "mode='auto' to fall back to ephemeral Pods."
        )

    def check_size(self, runnable: bytes, input_blob: bytes) -> None:
        limit = int(self.broker_info.get("max_message_bytes", defaults.MAX_MESSAGE_BYTES))
        size = len(runnable) + len(input_blob)
        if size > limit:
            raise PayloadTooLarge(
                f"the runnable and input come to {size} bytes, over the broker's limit of {limit}. "
                "Send less data (pass a reference such as a URL instead), or raise the broker's "
                "--max-message-bytes."
            )

    def client_allowance(self) -> int | None:
        """The bytes of task input the broker holds at most for this client key, when its WELCOME
        says (None: unknown, a broker that does not say)."""
        limit = self._allowance
        return None if limit is None else limit[0]

    def _binding_allowance(self) -> tuple[int, str] | None:
        """The smallest byte allowance WELCOME named, and the broker option that sets it."""
        return self._allowance

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

    def new_task_id(self) -> bytes:
        return self._id_prefix + next(self._ids).to_bytes(8, "big")

    def submit(self, submission: Submission) -> None:
        with self._lock:
            if self.closed or (self._failure is not None and not self._ready.is_set()):
                why = f"the connection to {self.address} is closed" if self.closed else str(self._failure)
                code = P.E_POOL_UNAVAILABLE if self.closed else _failure_code(self._failure)
                submission.sink.deliver(Event(submission.task_id, "error", code=code, message=why))
                return
            refusal = self._never_fits(submission)
            if refusal is not None:
                submission.sink.deliver(Event(submission.task_id, "error", code=P.E_QUEUE_FULL, message=refusal))
                return
            submission.wire_id = submission.wire_id or submission.task_id
            submission.sent_at = time.monotonic()
            submission.seq = next(self._seq)
            self._pending[submission.wire_id] = submission
            if not self._ready.is_set():  # the broker is being reached again: wait for it, unsent
                self._hold(submission, time.monotonic(), "")
                self._wake_io_thread()  # it watches the hold's deadline
                return
            self._offer(submission)
            self._receive()

    def cancel(self, task_id: bytes) -> None:
        """Stop a task: the broker is told only if it has the task (one held for a broker, or
        waiting for the allowance, is simply forgotten here)."""
        with self._lock:
            if self.closed:
                return
            wire_id = self._wire_ids.pop(task_id, task_id)
            submission = self._pending.get(wire_id)
            if submission is None:
                return
            in_broker = submission.hold_until is None and not submission.waiting
            freed = self._drop(wire_id, submission)
            if in_broker:
                self._send([P.PROTOCOL, P.CANCEL, wire_id])
                self._made_room(freed)
                self._receive()

    @property
    def waiting_tasks(self) -> int:
        """Tasks kept here for this client's allowance in the broker (not sent, or answered busy)."""
        return self._waiting_count

    def _never_fits(self, submission: Submission) -> str | None:
        """Why the broker could never take this task (more input than the whole allowance WELCOME
        named), or None: refused here rather than sent only to be refused."""
        allowance = self._binding_allowance()
        size = submission.wire_size()
        if allowance is None or size <= allowance[0]:
            return None
        limit, option = allowance
        return (f"this task holds {size} bytes of input, more than this client's whole allowance in the broker "
                f"({option} {limit}), so the broker could never take it; raise the broker's {option} (the "
                "chart's broker settings), or send less data (a reference such as a URL instead of the content)")

    def waiting_for_allowance(self, task_id: bytes) -> str | None:
        """Why the task waits here for the broker's allowance (the broker's own words when it
        answered busy), or None when it is not waiting."""
        with self._lock:
            submission = self._pending.get(self._wire_ids.get(task_id, task_id))
            if submission is None or not submission.waiting:
                return None
            return submission.busy_why or "this client's tasks fill its allowance in the broker"

    def allowance_advice(self) -> str:
        """How a user gives this client more room in the broker (for messages)."""
        limit = self.client_allowance()
        now = f" (now {limit} bytes)" if limit is not None else ""
        return (f"raise the broker's --client-queue-bytes{now} or --client-queue-size (the chart's broker "
                "settings), send fewer or smaller calls at once (max_concurrency), or raise timeout= on RunnableK8s")

    def status(self, timeout: float = 5.0, connect_timeout: float | None = None) -> dict[str, Any]:
        self.ensure_ready(connect_timeout)
        sink = ThreadSink()
        with self._lock:
            if self.closed:
                raise PoolUnavailable(f"the connection to {self.address} is closed")
            self._status_waiters.append(sink)
            self._send([P.PROTOCOL, P.STATUS])
            self._receive()
        try:
            answer: dict[str, Any] = sink.get(timeout)
        except queue.Empty:
            raise PoolUnavailable(f"the broker at {self.address} did not answer a status request") from None
        _WorkersSink(self).deliver(answer)  # what it says of the workers is news for ready_workers too
        return answer

    def ready_workers(self) -> int:
        """Workers taking tasks, as last heard from the broker: at WELCOME, then from a STATUS
        asked in the background once what was heard is older than ``POOL_SIZE_MAX_AGE`` (this
        call never waits for it; its answer serves the next caller)."""
        if not self._workers_asked and time.monotonic() - self._workers_heard > defaults.POOL_SIZE_MAX_AGE:
            with self._lock:
                if not self.closed and self._ready.is_set() and not self._workers_asked:
                    self._workers_asked = True
                    self._status_waiters.append(_WorkersSink(self))  # type: ignore[arg-type]
                    self._send([P.PROTOCOL, P.STATUS])
                    self._receive()
        return self._workers

    def _heard_workers(self, count: int | None) -> None:
        if count is not None:
            self._workers = count
        self._workers_heard = time.monotonic()
        self._workers_asked = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._lock:
            try:
                self._wake_out.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the I/O thread is gone already
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    # ------------------------------------------------------------------ the socket (under _lock)

    def _new_socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = transport.dealer_socket(self._context, self.keys)
        monitor = sock.get_monitor_socket(_MONITORED)
        sock.connect(self.address)
        return sock, monitor

    def _send_submission(self, submission: Submission, with_runnable: bool = False) -> None:
        first_time = submission.digest not in self._sent_digests
        blob = submission.runnable if (first_time or with_runnable) else b""
        self._sent_digests.add(submission.digest)
        submission.sent = True
        self._send([P.PROTOCOL, P.SUBMIT, submission.wire_id, submission.header, blob, submission.input])

    # ------------------------------------------------------------------ the allowance (under _lock)

    def _offer(self, submission: Submission) -> None:
        """Send a task now if the allowance has room and none waits before it; else it waits."""
        if not self._waiting_count and self._fits(submission.wire_size(), None):
            self._send_counted(submission)
            return
        self._wait(submission)
        if not self._window_tasks and self._retry_at is None:  # nothing will make room: go now
            self._pump()

    def _fits(self, size: int, credit: int | None) -> bool:
        """Whether a task of ``size`` may go: always when nothing is in flight (the broker then
        takes it, or says it can never fit); else within the allowance WELCOME named, or, not
        knowing it, while ``credit`` (bytes just freed) lasts (None: no busy answer seen)."""
        if not self._window_tasks:
            return True
        limit = self.client_allowance()
        if limit is not None:
            return self._window_bytes + size <= limit
        return credit is None or credit > 0

    def _wait(self, submission: Submission) -> None:
        submission.waiting = True
        self._waiting_count += 1
        heapq.heappush(self._waiting, (submission.seq, submission))  # seq is unique: never compares tasks

    def _pump(self, freed: int = 0) -> None:
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
            self._send_counted(submission)
        if self._window_tasks or not self._waiting_count:
            self._retry_at = None

    def _send_counted(self, submission: Submission) -> None:
        """Send a task, its relative timeout cut to what is left, and count it in the window."""
        now = time.monotonic()
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

    def _made_room(self, freed: int) -> None:
        """One of this connection's tasks left the broker: the waiting ones may go."""
        if freed:
            self._backoff = BUSY_BACKOFF_MIN
        if self._waiting_count and self._ready.is_set():
            self._pump(freed)

    def _busy(self, submission: Submission, why: str) -> None:
        """The broker did not take the task (the allowance is full now): keep it for later."""
        self._uncount(submission)
        submission.busy_why = why
        self._wait(submission)
        if not self._window_tasks and self._retry_at is None:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BUSY_BACKOFF_MAX)
            self._wake_io_thread()  # it sleeps until the retry

    def _send(self, frames: list[bytes]) -> None:
        try:
            transport.send_frames(self._sock, frames)
        except zmq.Again:
            log.debug("could not send %s: not connected", P.COMMAND_NAMES.get(frames[1]))

    def _receive(self) -> None:
        """Handle every message that has arrived. Whoever used the socket must call this before
        letting go of the lock: using a socket can swallow the wake-up of its file descriptor,
        which is all the I/O thread waits on."""
        for _ in range(1000):
            try:
                frames = transport.recv_frames(self._sock)
            except zmq.Again:
                return
            self._last_seen = time.monotonic()
            if len(frames) < 2 or frames[0] != P.PROTOCOL:
                if frames[0] != P.PROTOCOL and frames[0].startswith(P.PROTOCOL_FAMILY):
                    self._on_foreign_protocol(frames)
                else:
                    log.warning("ignored a malformed message from the broker")
                continue
            try:
                self._on_message(frames[1], frames[2:])
            except Exception:  # a bad message must not break the caller that read it
                log.warning("ignored a message from the broker that could not be handled", exc_info=True)
        self._wake_io_thread()  # more is waiting: the I/O thread carries on

    def _wake_io_thread(self) -> None:
        try:
            self._wake_out.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        next_beat = 0.0
        poller = zmq.Poller()
        poller.register(self._wake_in, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._sock.getsockopt(zmq.FD), zmq.POLLIN)
        try:
            while True:
                wake_at = next_beat
                for deadline in (self._hold_deadline, self._retry_at):
                    if deadline is not None and deadline < wake_at:
                        wake_at = deadline
                events = dict(poller.poll(max(0, int((wake_at - time.monotonic()) * 1000)) + 1))
                if self._wake_in in events:
                    while True:
                        try:
                            self._wake_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                with self._lock:
                    if self.closed:
                        self._send([P.PROTOCOL, P.BYE])
                        self._fail_all(PoolUnavailable, "the connection was closed")
                        return
                    if self._monitor in events:
                        self._on_monitor()
                    self._receive()
                    now = time.monotonic()
                    if self._hold_deadline is not None and now >= self._hold_deadline:
                        self._expire_held(now)
                    if self._retry_at is not None and now >= self._retry_at:
                        self._retry_at = None
                        if self._ready.is_set():
                            self._pump()
                    if now >= next_beat:
                        next_beat = now + P.HEARTBEAT_INTERVAL
                        if self._ready.is_set():
                            self._send([P.PROTOCOL, P.HEARTBEAT])
                            if now - self._last_seen > P.HEARTBEAT_EXPIRY:
                                self._lost(f"the broker at {self.address} stopped answering heartbeats")
                        else:
                            self._hello()
                        self._receive()
        except Exception:  # never leave callers hanging on a dead thread
            log.exception("runnable-k8s connection thread failed")
            with self._lock:
                self._fail_all(PoolUnavailable, "the client's connection thread failed; see the log")
        finally:
            with self._lock:
                self.closed = True
                self._ready.clear()
                for sock in (self._sock, self._monitor, self._wake_in, self._wake_out):
                    sock.close(linger=0)
            self._context.term()

    def _hello(self) -> None:
        self._send([P.PROTOCOL, P.HELLO, P.encode_json(P.environment())])

    def _on_monitor(self) -> None:
        while True:
            try:
                message = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._hello()
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._welcomed:
                # The peer closed the connection during the handshake. A broker refusing a key
                # does that, and so does a relay with no broker behind it: the k8s:// port-forward
                # while the old broker Pod is gone and the new one not ready, a load balancer with
                # no backend. This connection was welcomed with these keys before, so it is taken
                # for the relay: the held calls wait for the next broker for as long as their
                # patience (a broker that really refuses the keys now fails them then, saying so).
                self._dropped_handshakes += 1
                if self._dropped_handshakes == 1:
                    log.info("the peer at %s closed the connection during the handshake; waiting for a "
                             "broker to answer", self.address)
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self._failure = AuthenticationFailed(
                    f"the broker at {self.address} refused this client's CurveZMQ handshake. Check "
                    "that the client's public key is in the broker's clients/ allow-list and that "
                    "the client uses its own folder of `runnable-k8s keys DIR` (DIR/clients/NAME); "
                    "a broker with keys also refuses clients without them."
                )
                self._fail_all(AuthenticationFailed, str(self._failure))
                self._settled.set()
            elif event == zmq.EVENT_DISCONNECTED and self._ready.is_set():
                self._lost(f"the connection to the broker at {self.address} dropped")

    def _lost(self, why: str) -> None:
        """The broker is gone (or no longer knows this client): hold what may be resubmitted,
        fail the rest, and wait for a broker to answer HELLO."""
        self._ready.clear()
        self._settled.clear()
        self._sent_digests.clear()
        now = time.monotonic()
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
            submission.sink.deliver(Event(submission.task_id, "error", code=P.E_POOL_UNAVAILABLE, message=refusal))
        while self._status_waiters:
            self._status_waiters.popleft().deliver({"error": why})
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
            submission.sink.deliver(Event(submission.task_id, "error", code=P.E_POOL_UNAVAILABLE, message=(
                f"{lost}no runnable-k8s broker answered at {self.address} within the connect timeout of "
                f"{self._patience(submission):g}s, so the call was not {'re' if lost else ''}submitted"
                + self._dropped_why())))
        self._hold_deadline = soonest

    def _dropped_why(self) -> str:
        if not self._dropped_handshakes:
            return ""
        return (f"; the peer there closed {self._dropped_handshakes} connection attempts during the handshake "
                "(a relay such as a k8s:// port-forward with no ready broker Pod behind it, or a broker that "
                "no longer accepts this client's CurveZMQ keys)")

    def _resubmit_held(self) -> None:
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
            self._offer(submission)

    def _drop(self, wire_id: bytes, submission: Submission) -> int:
        """Forget a task in flight (its caller gets, or got, its last event); return the bytes
        it freed in the window."""
        self._pending.pop(wire_id, None)
        if wire_id != submission.task_id:
            self._wire_ids.pop(submission.task_id, None)
        if submission.waiting:  # left in the heap, skipped there
            submission.waiting = False
            self._waiting_count -= 1
        return self._uncount(submission)

    def _fail_all(self, error: type[RunnableK8sError], message: str) -> None:
        code = _failure_code(error)
        for submission in list(self._pending.values()):
            submission.sink.deliver(Event(submission.task_id, "error", code=code, message=message))
        self._pending.clear()
        self._wire_ids.clear()
        self._hold_deadline = None
        self._waiting.clear()
        self._waiting_count = self._window_bytes = self._window_tasks = 0
        self._retry_at = None
        while self._status_waiters:
            self._status_waiters.popleft().deliver({"error": message})

    def _on_message(self, command: bytes, body: list[bytes]) -> None:
        if command == P.RESULT and len(body) == 2:
            submission = self._pending.get(body[0])
            if submission is not None and submission.hold_until is None and not submission.waiting:
                freed = self._drop(body[0], submission)
                submission.sink.deliver(Event(submission.task_id, "result", body[1]))
                self._made_room(freed)
        elif command == P.CHUNK and len(body) == 2:
            submission = self._pending.get(body[0])
            if submission is not None and submission.hold_until is None:
                submission.delivered = True
                submission.sink.deliver(Event(submission.task_id, "chunk", body[1]))
        elif command == P.EVENT and len(body) == 2:
            # A relayed callback: not "delivered" output, so a call that reported only callbacks
            # may still be resubmitted after a broker loss (its handlers then see a new attempt).
            submission = self._pending.get(body[0])
            if submission is not None and submission.hold_until is None:
                submission.sink.deliver(Event(submission.task_id, "event", body[1]))
        elif command == P.ERROR and len(body) >= 3:
            self._on_error(body[0], body[1], body[2].decode("utf-8", "replace"), body[3] if len(body) > 3 else b"")
        elif command == P.WELCOME and body:
            self.broker_info = P.decode_json_object(body[0])
            self._heard_workers(_count(self.broker_info.get("workers")))
            self._failure = None
            self._welcomed = True
            self._dropped_handshakes = 0
            self._ready.set()
            self._settled.set()
            if self._hold_deadline is not None:
                self._resubmit_held()
        elif command == P.STATUS and body:
            if self._status_waiters:
                self._status_waiters.popleft().deliver(P.decode_json_object(body[0]))
        elif command == P.RECONNECT:  # a broker that does not know this client: a new one
            self._lost(f"the broker at {self.address} restarted (it no longer knew this client)")
            self._hello()
        elif command != P.HEARTBEAT:
            log.warning("ignored an unexpected %s from the broker", P.COMMAND_NAMES.get(command, command))

    def _on_error(self, task_id: bytes, code: bytes, message: str, detail: bytes) -> None:
        if not task_id:  # about the connection, not a task
            if code == P.E_INCOMPATIBLE:
                self._failure = IncompatibleWorker(f"the broker at {self.address} refused this client: {message}")
                self._fail_all(IncompatibleWorker, str(self._failure))
                self._settled.set()
            elif code == P.E_UNAUTHORIZED:  # a key the broker knows, but not as a client's (or revoked)
                self._failure = AuthenticationFailed(f"the broker at {self.address} refused this client: {message}")
                self._fail_all(AuthenticationFailed, str(self._failure))
                self._settled.set()
            log.error("broker: %s", message)
            return
        submission = self._pending.get(task_id)
        if submission is None or submission.hold_until is not None or submission.waiting:
            return  # a late answer about a task given up on, or about its wire id before a loss
        if code == P.E_BUSY:
            self._busy(submission, message)
        elif code == P.E_NEED_RUNNABLE:
            self._send_submission(submission, with_runnable=True)
        elif code == P.E_HELLO_REQUIRED:
            # This task was refused, not run: it waits for the broker as it is. The others in
            # flight were sent to a broker that is gone (or that forgot this client).
            self._hold(submission, time.monotonic(), "")
            self._lost(f"the broker at {self.address} restarted (it no longer knew this client)")
            self._hello()
        else:
            freed = self._drop(task_id, submission)
            submission.sink.deliver(Event(submission.task_id, "error", detail, code, message))
            self._made_room(freed)

    def _on_foreign_protocol(self, frames: list[bytes]) -> None:
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
        self._failure = IncompatibleWorker(
            f"the broker at {self.address} speaks protocol {theirs} but this client speaks {ours}: {advice}"
            + (f". The broker said: {said}" if said else ""))
        if not self._incompatible_logged:
            self._incompatible_logged = True
            log.error("%s", self._failure)
        self._fail_all(IncompatibleWorker, str(self._failure))
        self._settled.set()


class _WorkersSink:
    """Takes a STATUS answer asked for by :meth:`Connection.ready_workers`."""

    __slots__ = ("connection",)

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def deliver(self, status: Any) -> None:
        workers = status.get("workers") if isinstance(status, dict) else None
        count = sum(1 for w in workers if isinstance(w, dict) and not w.get("draining")) \
            if isinstance(workers, list) else None
        self.connection._heard_workers(count)


def _failure_code(error: BaseException | type[BaseException] | None) -> bytes:
    """The error code a call fails with when the connection itself failed with ``error``."""
    kind = error if isinstance(error, type) else type(error)
    if issubclass(kind, IncompatibleWorker):
        return P.E_INCOMPATIBLE
    if issubclass(kind, AuthenticationFailed):
        return P.E_UNAUTHORIZED
    return P.E_POOL_UNAVAILABLE


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@atexit.register
def _close_connections_at_exit() -> None:
    Connection.close_all()
