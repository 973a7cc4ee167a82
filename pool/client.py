"""The client's one connection to a broker, shared by every RunnableK8s, thread and event loop.

A ZeroMQ socket must stay on one thread, so one I/O thread owns the DEALER socket. Callers hand
it commands through a queue (waking it with an inproc message) and receive their task's events
through a *sink*: a thread-safe queue for sync callers, an ``asyncio.Queue`` fed with
``call_soon_threadsafe`` for async callers, so an awaiting coroutine holds no thread. Many calls
are in flight at once; events carry the task id.

The I/O thread also says HELLO (again after a broker restart), heartbeats, notices a lost broker
(a TCP disconnect at once, a silent one after the heartbeat expiry) and fails every call in flight
with ``PoolUnavailable`` instead of letting it hang.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from pool.errors import AuthenticationFailed, PayloadTooLarge, PoolUnavailable, RunnableK8sError
from worker import protocol as P
from worker.curve import PeerKeys

log = logging.getLogger("runnable_k8s.client")

DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass
class Event:
    """Something that happened to a task: a chunk, its result, or an error code from the pool."""

    task_id: bytes
    kind: str  # "chunk" | "result" | "error"
    data: bytes = b""
    code: bytes = b""
    message: str = ""


class ThreadSink:
    """Where a sync caller waits for its events."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def deliver(self, event: Any) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None) -> Any:
        """The next event; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._queue.get(timeout=timeout)


class LoopSink:
    """Where a coroutine waits for its events without holding a thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def deliver(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more

    async def get(self, timeout: float | None) -> Any:
        """The next event; raises ``TimeoutError`` after ``timeout`` seconds."""
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)


@dataclass
class Submission:
    task_id: bytes
    header: bytes
    digest: str
    runnable: bytes
    input: bytes
    sink: Any
    awaiting_hello: bool = False


_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


class Connection:
    """Use :meth:`shared`; one instance per (process, address, keys)."""

    _registry: dict[tuple[int, str, Any], Connection] = {}
    _registry_lock = threading.Lock()
    _counter = itertools.count()

    @classmethod
    def shared(cls, address: str, keys: PeerKeys | None = None,
               connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Connection:
        key = (os.getpid(), address, keys)  # a forked child gets its own (zmq is not fork-safe)
        with cls._registry_lock:
            connection = cls._registry.get(key)
            if connection is None or connection.closed:
                connection = cls(address, keys, connect_timeout)
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

    def __init__(self, address: str, keys: PeerKeys | None, connect_timeout: float) -> None:
        self.address = address
        self.keys = keys
        self.connect_timeout = connect_timeout
        self.closed = False
        self.broker_info: dict[str, Any] = {}
        self._ready = threading.Event()
        # Set when a connection attempt has an outcome: WELCOME, or a refusal in _failure.
        self._settled = threading.Event()
        self._failure: BaseException | None = None
        self._outbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._context = zmq.Context()
        self._wake_endpoint = f"inproc://rk8s-wake-{next(self._counter)}"
        self._wake_in = self._context.socket(zmq.PULL)
        self._wake_in.bind(self._wake_endpoint)
        self._wake_out = self._context.socket(zmq.PUSH)
        self._wake_out.linger = 0
        self._wake_out.connect(self._wake_endpoint)
        self._wake_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"runnable-k8s-io {address}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (any thread)

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
            f"no runnable-k8s broker answered at {self.address} within {timeout:g}s. "
            "Start one (`runnable-k8s local`, or the Helm chart), check the address, or use "
            "mode='auto' to fall back to ephemeral Pods."
        )

    def check_size(self, runnable: bytes, input_blob: bytes) -> None:
        limit = int(self.broker_info.get("max_message_bytes", P.DEFAULT_MAX_MESSAGE_BYTES))
        size = len(runnable) + len(input_blob)
        if size > limit:
            raise PayloadTooLarge(
                f"the runnable and input come to {size} bytes, over the broker's limit of {limit}. "
                "Send less data (pass a reference such as a URL instead), or raise the broker's "
                "--max-message-bytes."
            )

    def submit(self, submission: Submission) -> None:
        self._command(("submit", submission))

    def cancel(self, task_id: bytes) -> None:
        self._command(("cancel", task_id))

    def status(self, timeout: float = 5.0, connect_timeout: float | None = None) -> dict[str, Any]:
        self.ensure_ready(connect_timeout)
        sink = ThreadSink()
        self._command(("status", sink))
        try:
            return sink.get(timeout)
        except queue.Empty:
            raise PoolUnavailable(f"the broker at {self.address} did not answer a status request") from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._command(("close",))
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _command(self, command: tuple[Any, ...]) -> None:
        self._outbox.append(command)
        with self._wake_lock:
            try:
                self._wake_out.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the I/O thread has wake-ups queued already; it will see the command
            except zmq.ZMQError:
                pass  # closed while we raced it

    # ------------------------------------------------------------------ I/O thread

    def _new_socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.rcvhwm = 0
        if self.keys is not None:
            self.keys.apply(sock)
        monitor = sock.get_monitor_socket(_MONITORED)
        sock.connect(self.address)
        return sock, monitor

    def _run(self) -> None:
        self._pending: dict[bytes, Submission] = {}
        self._status_waiters: collections.deque[ThreadSink] = collections.deque()
        self._sent_digests: set[str] = set()
        self._sock, self._monitor = self._new_socket()
        self._last_seen = time.monotonic()
        next_beat = 0.0
        poller = zmq.Poller()
        for sock in (self._wake_in, self._sock, self._monitor):
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(max(0, int((next_beat - time.monotonic()) * 1000)) + 1))
                if self._wake_in in events:
                    while True:
                        try:
                            self._wake_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if not self._drain_outbox():
                    return
                if self._monitor in events:
                    self._on_monitor()
                if self._sock in events:
                    self._receive()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + P.HEARTBEAT_INTERVAL
                    if self._ready.is_set():
                        self._send([P.PROTOCOL, P.HEARTBEAT])
                        if now - self._last_seen > P.HEARTBEAT_EXPIRY:
                            self._lost(f"the broker at {self.address} stopped answering heartbeats")
                    else:
                        self._hello()
        except Exception:  # noqa: BLE001 - never leave callers hanging on a dead thread
            log.exception("runnable-k8s connection thread failed")
            self._fail_all(PoolUnavailable, "the client's connection thread failed; see the log")
        finally:
            self.closed = True
            self._ready.clear()
            for sock in (self._sock, self._monitor, self._wake_in, self._wake_out):
                sock.close(linger=0)
            self._context.term()

    def _drain_outbox(self) -> bool:
        while self._outbox:
            command = self._outbox.popleft()
            kind = command[0]
            if kind == "submit":
                submission: Submission = command[1]
                if not self._ready.is_set():
                    submission.sink.deliver(Event(submission.task_id, "error", code=P.E_POOL_UNAVAILABLE,
                                                  message=f"lost the connection to {self.address}"))
                    continue
                self._pending[submission.task_id] = submission
                self._send_submission(submission)
            elif kind == "cancel":
                if self._pending.pop(command[1], None) is not None:
                    self._send([P.PROTOCOL, P.CANCEL, command[1]])
            elif kind == "status":
                self._status_waiters.append(command[1])
                self._send([P.PROTOCOL, P.STATUS])
            elif kind == "close":
                self._send([P.PROTOCOL, P.BYE])
                self._fail_all(PoolUnavailable, "the connection was closed")
                return False
        return True

    def _send_submission(self, submission: Submission, with_runnable: bool = False) -> None:
        first_time = submission.digest not in self._sent_digests
        blob = submission.runnable if (first_time or with_runnable) else b""
        self._sent_digests.add(submission.digest)
        self._send([P.PROTOCOL, P.SUBMIT, submission.task_id, submission.header, blob, submission.input])

    def _send(self, frames: list[bytes]) -> None:
        try:
            P.send_frames(self._sock, frames)
        except zmq.Again:
            log.debug("could not send %s: not connected", P.COMMAND_NAMES.get(frames[1]))

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
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self._failure = AuthenticationFailed(
                    f"the broker at {self.address} refused this client's CurveZMQ handshake. Check "
                    "that the client's key is in the broker's authorized/ directory and that the "
                    "client uses the broker's public key (`runnable-k8s keys`); a broker with keys "
                    "also refuses clients without them."
                )
                self._fail_all(AuthenticationFailed, str(self._failure))
                self._settled.set()
            elif event == zmq.EVENT_DISCONNECTED and self._ready.is_set():
                self._lost(f"the connection to the broker at {self.address} dropped")

    def _lost(self, why: str) -> None:
        log.warning("%s; calls in flight fail with PoolUnavailable", why)
        self._ready.clear()
        self._settled.clear()
        self._sent_digests.clear()
        self._fail_all(PoolUnavailable, why + "; retry the call once the broker is back")

    def _fail_all(self, error: type[RunnableK8sError], message: str) -> None:
        code = P.E_UNAUTHORIZED if error is AuthenticationFailed else P.E_POOL_UNAVAILABLE
        for task_id, submission in list(self._pending.items()):
            submission.sink.deliver(Event(task_id, "error", code=code, message=message))
        self._pending.clear()
        while self._status_waiters:
            self._status_waiters.popleft().deliver({"error": message})

    def _receive(self) -> None:
        for _ in range(1000):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_seen = time.monotonic()
            if len(frames) < 2 or frames[0] != P.PROTOCOL:
                log.warning("ignored a malformed message from the broker")
                continue
            self._on_message(frames[1], frames[2:])

    def _on_message(self, command: bytes, body: list[bytes]) -> None:
        if command in (P.CHUNK, P.RESULT) and len(body) == 2:
            final = command == P.RESULT
            submission = self._pending.pop(body[0], None) if final else self._pending.get(body[0])
            if submission is not None:
                submission.sink.deliver(Event(body[0], "result" if final else "chunk", body[1]))
        elif command == P.ERROR and len(body) >= 3:
            self._on_error(body[0], body[1], body[2].decode("utf-8", "replace"), body[3] if len(body) > 3 else b"")
        elif command == P.WELCOME and body:
            self.broker_info = P.decode_json_object(body[0])
            self._failure = None
            self._ready.set()
            self._settled.set()
            for submission in self._pending.values():
                if submission.awaiting_hello:
                    submission.awaiting_hello = False
                    self._send_submission(submission, with_runnable=True)
        elif command == P.STATUS and body:
            if self._status_waiters:
                self._status_waiters.popleft().deliver(P.decode_json_object(body[0]))
        elif command == P.RECONNECT:
            self._ready.clear()
            self._settled.clear()
            self._sent_digests.clear()
            self._hello()
        elif command != P.HEARTBEAT:
            log.warning("ignored an unexpected %s from the broker", P.COMMAND_NAMES.get(command, command))

    def _on_error(self, task_id: bytes, code: bytes, message: str, detail: bytes) -> None:
        if not task_id:  # about the connection, not a task
            if code == P.E_INCOMPATIBLE:
                from pool.errors import IncompatibleWorker

                self._failure = IncompatibleWorker(f"the broker at {self.address} refused this client: {message}")
                self._settled.set()
            log.error("broker: %s", message)
            return
        submission = self._pending.get(task_id)
        if submission is None:
            return
        if code == P.E_NEED_RUNNABLE:
            self._send_submission(submission, with_runnable=True)
        elif code == P.E_HELLO_REQUIRED:
            submission.awaiting_hello = True
            self._ready.clear()
            self._settled.clear()
            self._sent_digests.clear()
            self._hello()
        else:
            del self._pending[task_id]
            submission.sink.deliver(Event(task_id, "error", detail, code, message))


@atexit.register
def _close_connections_at_exit() -> None:
    Connection.close_all()
