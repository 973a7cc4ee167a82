"""The client's one connection to a broker, shared by every RunnableK8s, thread and event loop.

This module is the shell around :class:`~pool.client.core.ClientCore`, which holds every rule
(what is in flight, held after a broker loss, waiting for the allowance; what each broker message
does; see ``pool.client.core``). The shell owns what the core must not: the socket, its monitor,
the I/O thread, the lock and the clock. It reads the clock once per pass, hands the core each
message as read, and the core sends through the shell's socket and delivers each reply to its
caller's sink (``pool.client.sinks``).

One DEALER socket per process and broker, guarded by a lock: a ZeroMQ socket may be used by one
thread at a time (the lock is also the memory barrier ZeroMQ asks for when a socket changes
threads). A caller sends its own SUBMIT or CANCEL while holding the lock, with no hand-off to
another thread, and then reads whatever arrived meanwhile. Between calls the connection's I/O
thread waits on the socket's file descriptor (not on the socket itself, so it holds no lock while
it waits), reads replies and hands each task's replies to the caller's *sink*: a thread-safe queue
for sync callers, or, for async callers, a per-event-loop mailbox that wakes the loop once per
batch of replies, so an awaiting coroutine holds no thread. A sync caller waiting for its reply
reads the socket itself while no other caller does (:meth:`Connection.wait`, leader/follower), and
the I/O thread leaves the socket to it: a lone sync caller's reply wakes only its thread. Many
calls are in flight at once; replies carry the task id.

The I/O thread also says HELLO (again after a broker restart), heartbeats, and notices a lost
broker: a disconnect at once, a silent one after the heartbeat expiry, a restarted one when it
answers RECONNECT or HELLO_REQUIRED (it no longer knows this client). No call is left to hang.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import threading
import time
from typing import Any, ClassVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from pool.client.core import ALLOWANCE_BYTES_KEYS, BUSY_BACKOFF_MAX, BUSY_BACKOFF_MIN, ClientCore, Reply, Submission
from pool.client.sinks import LoopSink, ThreadSink
from pool.errors import AuthenticationFailed, PoolUnavailable
from worker import defaults, transport
from worker import protocol as P
from worker.curve import PeerKeys

__all__ = ["ALLOWANCE_BYTES_KEYS", "BUSY_BACKOFF_MAX", "BUSY_BACKOFF_MIN", "DEFAULT_CONNECT_TIMEOUT", "Connection",
           "Event", "LoopSink", "ReaderSink", "Reply", "Submission", "ThreadSink", "check_plaintext"]

log = logging.getLogger("runnable_k8s.client")

DEFAULT_CONNECT_TIMEOUT = defaults.CONNECT_TIMEOUT

Event = Reply
"""The former name of :class:`~pool.client.core.Reply` (kept for code written against it)."""

_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


class ReaderSink(ThreadSink):
    """A sync caller's sink for :meth:`Connection.wait`: while its caller reads the socket itself,
    a reply delivered by another thread (the I/O thread failing the task after a broker loss, or a
    caller that read it first) also writes a byte to the connection's wake-up pipe, which the
    reading caller polls beside the socket."""

    __slots__ = ("reader", "wake_fd")

    def __init__(self) -> None:
        super().__init__()
        self.reader: int | None = None  # the reading thread's ident while it reads
        self.wake_fd = -1

    def deliver(self, reply: Any) -> None:
        super().deliver(reply)
        reader = self.reader
        if reader is not None and reader != threading.get_ident():
            try:
                os.write(self.wake_fd, b"x")
            except OSError:
                pass  # the pipe is full (the reader is waking anyway) or closed with the connection


def check_plaintext(address: str, keys: PeerKeys | None, insecure: bool) -> None:
    """Refuse plaintext (no keys) to an address off this machine unless told ``insecure``
    (docs/design.md#trust-one-pool-is-one-trust-domain): loopback, ipc:// and inproc:// are
    always fine."""
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
        # Set when a connection attempt has an outcome: WELCOME, or a refusal in the core's failure.
        self._settled = threading.Event()
        # The core and the socket are used under _lock only.
        self._lock = threading.Lock()
        self._context = zmq.Context()
        self._sock, self._monitor = self._new_socket()
        wake_endpoint = f"inproc://rk8s-wake-{next(self._counter)}"
        self._wake_in = self._context.socket(zmq.PULL)
        self._wake_in.bind(wake_endpoint)
        self._wake_out = self._context.socket(zmq.PUSH)
        self._wake_out.linger = 0
        self._wake_out.connect(wake_endpoint)
        # Leader/follower: a sync caller waiting for its reply reads the socket itself while no
        # other caller does (``wait``); meanwhile the I/O thread leaves the socket to it.
        self._reader = threading.Lock()  # held by the caller reading the socket
        self._leading = False  # under _lock: a caller reads the socket now
        self._io_polls_socket = True  # under _lock: the I/O thread's current poll includes the socket
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)
        self._socket_fd = self._sock.getsockopt(zmq.FD)
        self._reader_poller = zmq.Poller()
        self._reader_poller.register(self._socket_fd, zmq.POLLIN)
        self._reader_poller.register(self._pipe_r, zmq.POLLIN)
        self._core = ClientCore(address, connect_timeout, send=self._send, now=time.monotonic(),
                                wake=self._wake_io_thread, settled=self._settled.set, unsettled=self._settled.clear)
        self._thread = threading.Thread(target=self._run, name=f"runnable-k8s-io {address}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (any thread)

    @property
    def ready(self) -> bool:
        """True while the broker has welcomed this connection and not been lost since."""
        return self._core.ready

    def ensure_ready(self, timeout: float | None = None) -> None:
        """Return once the broker has said WELCOME; raise ``PoolUnavailable`` if it does not
        within ``timeout`` (default: the connection's connect timeout)."""
        core = self._core
        if core.ready:
            return
        if self.closed:
            raise PoolUnavailable(f"the connection to {self.address} is closed")
        timeout = self.connect_timeout if timeout is None else timeout
        self._settled.wait(timeout)
        if core.ready:
            return
        if core.failure is not None:
            raise core.failure
        raise PoolUnavailable(
            f"no runnable-k8s broker answered at {self.address} within {timeout:g}s{core.dropped_why()}. "
            "Start one (`runnable-k8s local` prints the address to pass; on a cluster, the Helm chart), "
            "or check the address."
        )

    def check_size(self, runnable: bytes, input_blob: bytes) -> None:
        """Raise ``PayloadTooLarge`` for a task over the broker's message limit."""
        self._core.check_size(runnable, input_blob)

    def client_allowance(self) -> int | None:
        """The bytes of task input the broker holds at most for this client key, when its WELCOME
        says (None: unknown, a broker that does not say)."""
        return self._core.client_allowance()

    @property
    def broker_info(self) -> dict[str, Any]:
        """What the broker said at WELCOME (its limits, allowances and worker count)."""
        return self._core.broker_info

    @broker_info.setter
    def broker_info(self, info: dict[str, Any]) -> None:
        self._core.broker_info = info

    def new_task_id(self) -> bytes:
        return self._core.new_task_id()

    def submit(self, submission: Submission, reads: bool = False) -> None:
        """Send a caller's task (or keep it until it may go); its replies go to its sink.
        ``reads``: the caller will wait with :meth:`wait`, reading the socket itself."""
        with self._lock:
            if self.closed:
                submission.sink.deliver(Reply(submission.task_id, "error", code=P.E_POOL_UNAVAILABLE,
                                              message=f"the connection to {self.address} is closed"))
                return
            now = time.monotonic()
            self._core.submit(submission, now)
            self._receive(now)
            if not reads:
                self._someone_reads()

    def wait(self, sink: ReaderSink, timeout: float | None) -> Any:
        """A sync caller's next reply (``queue.Empty`` after ``timeout`` seconds). When no other
        caller is reading the socket, this one does (the leader): it polls the socket's file
        descriptor and its wake-up pipe, reads whatever arrived and hands others' replies to
        their sinks, so its own reply wakes only this thread. Otherwise (a follower) it waits on
        its sink, filled by the leader or the I/O thread. The I/O thread goes on heartbeating,
        watching the monitor and reading for async callers meanwhile."""
        try:
            return sink.get(0)
        except queue.Empty:
            pass
        if timeout is not None and timeout <= 0:
            raise queue.Empty
        if self.closed or not self._reader.acquire(blocking=False):
            return sink.get(timeout)
        try:
            return self._lead(sink, timeout)
        finally:
            self._reader.release()

    def _lead(self, sink: ReaderSink, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        sink.wake_fd = self._pipe_w
        sink.reader = threading.get_ident()
        with self._lock:
            self._leading = True
            self._drain_pipe()
            if not self.closed:
                self._receive(time.monotonic())
        try:
            socket_fd = self._socket_fd
            poll = self._reader_poller.poll
            while True:
                try:
                    return sink.get(0)
                except queue.Empty:
                    pass
                if self.closed:
                    return sink.get(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if deadline is None:
                    wait_ms = -1
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise queue.Empty
                    wait_ms = int(left * 1000) + 1
                events = dict(poll(wait_ms))
                if self._pipe_r in events:
                    self._drain_pipe()
                if socket_fd in events:
                    with self._lock:
                        if not self.closed:
                            self._receive(time.monotonic())
        finally:
            sink.reader = None
            with self._lock:
                self._leading = False
                if self._core.pending_count:  # others wait for replies: someone must read them
                    self._someone_reads()

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._pipe_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _someone_reads(self) -> None:
        """Under ``_lock``: make sure a reply now awaited will be read: by the reading caller, or
        the I/O thread (woken to poll the socket again if it had left it to a reader)."""
        if not self._leading and not self._io_polls_socket:
            self._io_polls_socket = True  # it will be, once awake: one wake-up is enough
            self._wake_io_thread()

    def cancel(self, task_id: bytes) -> None:
        """Stop a task: the broker is told only if it has the task (one held for a broker, or
        waiting for the allowance, is simply forgotten here)."""
        with self._lock:
            if self.closed:
                return
            now = time.monotonic()
            if self._core.cancel(task_id, now):
                self._receive(now)

    @property
    def waiting_tasks(self) -> int:
        """Tasks kept here for this client's allowance in the broker (not sent, or answered busy)."""
        return self._core.waiting_count

    def waiting_for_allowance(self, task_id: bytes) -> str | None:
        """Why the task waits here for the broker's allowance (the broker's own words when it
        answered busy), or None when it is not waiting."""
        with self._lock:
            return self._core.waiting_for_allowance(task_id)

    def allowance_advice(self) -> str:
        """How a user gives this client more room in the broker (for messages)."""
        return self._core.allowance_advice()

    def status(self, timeout: float = 5.0, connect_timeout: float | None = None) -> dict[str, Any]:
        """The broker's STATUS (its workers, queue and counters)."""
        self.ensure_ready(connect_timeout)
        sink = ThreadSink()
        with self._lock:
            if self.closed:
                raise PoolUnavailable(f"the connection to {self.address} is closed")
            self._core.request_status(sink)
            self._receive(time.monotonic())
            self._someone_reads()
        try:
            answer: dict[str, Any] = sink.get(timeout)
        except queue.Empty:
            raise PoolUnavailable(f"the broker at {self.address} did not answer a status request") from None
        self._core.heard_status(answer, time.monotonic())  # news for ready_workers too
        return answer

    def ready_workers(self) -> int:
        """Workers taking tasks, as last heard from the broker: at WELCOME, then from a STATUS
        asked in the background once what was heard is older than ``POOL_SIZE_MAX_AGE`` (this
        call never waits for it; its answer serves the next caller)."""
        core = self._core
        if core.workers_stale(time.monotonic()):
            with self._lock:
                if not self.closed and core.ask_workers():
                    self._receive(time.monotonic())
                    self._someone_reads()
        return core.workers

    def close(self) -> None:
        """Stop the I/O thread: it says BYE, and every call still in flight fails with
        ``PoolUnavailable``."""
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

    def _send(self, frames: list[bytes]) -> None:
        try:
            transport.send_frames(self._sock, frames)
        except zmq.Again:
            log.debug("could not send %s: not connected", P.COMMAND_NAMES.get(frames[1]))

    def _receive(self, now: float) -> None:
        """Hand the core every message that has arrived. Whoever used the socket must call this
        before letting go of the lock: using a socket can swallow the wake-up of its file
        descriptor, which is all the I/O thread waits on. The clock is read once per pass, not
        per message: ``now`` is when the pass began."""
        recv, sock, on_message = transport.recv_frames, self._sock, self._core.on_message
        for _ in range(1000):
            try:
                frames = recv(sock)
            except zmq.Again:
                return
            on_message(frames, now)
        self._wake_io_thread()  # more is waiting: the I/O thread carries on

    def _wake_io_thread(self) -> None:
        try:
            self._wake_out.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        core = self._core
        # Two poll sets: with the socket, and without it while a sync caller reads it (``wait``).
        without_socket = zmq.Poller()
        without_socket.register(self._wake_in, zmq.POLLIN)
        without_socket.register(self._monitor, zmq.POLLIN)
        with_socket = zmq.Poller()
        with_socket.register(self._wake_in, zmq.POLLIN)
        with_socket.register(self._monitor, zmq.POLLIN)
        with_socket.register(self._sock.getsockopt(zmq.FD), zmq.POLLIN)
        poller = with_socket
        try:
            while True:
                events = dict(poller.poll(max(0, int((core.next_deadline - time.monotonic()) * 1000)) + 1))
                if self._wake_in in events:
                    while True:
                        try:
                            self._wake_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                with self._lock:
                    now = time.monotonic()
                    if self.closed:
                        core.close(now)
                        return
                    if self._monitor in events:
                        self._on_monitor(now)
                    self._receive(now)
                    if core.tick(now):  # something was due (and may have used the socket)
                        self._receive(now)
                    # Leave the socket to a reading caller; take it back when one stops while
                    # replies are awaited (``_lead`` wakes this thread then), or when a caller
                    # that does not read submits (``_someone_reads``). Until then what arrives
                    # is read at the next heartbeat at the latest.
                    # While (re)connecting it reads too: WELCOME must not wait for a heartbeat.
                    self._io_polls_socket = not self._leading or not core.ready
                    poller = with_socket if self._io_polls_socket else without_socket
        except Exception:  # never leave callers hanging on a dead thread
            log.exception("runnable-k8s connection thread failed")
            with self._lock:
                core.fail(PoolUnavailable, "the client's connection thread failed; see the log", time.monotonic())
        finally:
            with self._lock:
                self.closed = True
                core.ready = False
                for sock in (self._sock, self._monitor, self._wake_in, self._wake_out):
                    sock.close(linger=0)
            self._context.term()
            # A reading caller was handed its error (``core.close``) and leaves; then the pipe goes.
            if self._reader.acquire(timeout=5):
                self._reader.release()
            for fd in (self._pipe_r, self._pipe_w):
                os.close(fd)

    def _on_monitor(self, now: float) -> None:
        """Tell the core what the socket's monitor saw: a handshake's outcome, a drop."""
        core = self._core
        while True:
            try:
                message = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                core.on_connected()
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                core.on_handshake_failed(True, now)
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                core.on_handshake_failed(False, now)
            elif event == zmq.EVENT_DISCONNECTED:
                core.on_disconnected(now)


@atexit.register
def _close_connections_at_exit() -> None:
    Connection.close_all()
