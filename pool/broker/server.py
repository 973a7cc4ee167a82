"""The broker: hands each client task to a worker with a free slot.

One ROUTER socket serves clients and workers (one port to expose or port-forward). The loop is a
dispatch on the command of each message (see ``worker.protocol`` for the wire); all state lives in
the small classes below and is touched only by the loop's thread. The broker never trusts a
message: anything malformed is logged, counted and dropped, never fatal.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import zmq

from pool.keys import BrokerKeys
from pool.broker.scheduling import Candidate, choose_worker
from worker import defaults
from worker import protocol as P
from worker.codec import digest as content_digest

log = logging.getLogger("runnable_k8s.broker")

_RCVMORE = int(zmq.RCVMORE)

class BrokerConfigError(ValueError):
    """The broker was asked to start in a way that is unsafe or impossible."""


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (tcp on 127.0.0.0/8 or ::1, ipc, inproc)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: assume it is reachable from outside


@dataclass
class WorkerState:
    identity: bytes
    environment: dict[str, Any]
    env_key: tuple[Any, ...]
    slots: int
    expiry: float
    running: set[bytes] = field(default_factory=set)
    runnables: OrderedDict[str, None] = field(default_factory=OrderedDict)  # digests it holds
    cache_size: int = 64
    draining: bool = False
    unreachable: bool = False  # a send to it failed: its connection is gone
    last_assigned: float = 0.0

    def remember(self, digest: str) -> None:
        self.runnables[digest] = None
        self.runnables.move_to_end(digest)
        while len(self.runnables) > self.cache_size:
            self.runnables.popitem(last=False)


@dataclass
class ClientState:
    identity: bytes
    environment: dict[str, Any]
    env_key: tuple[Any, ...]
    expiry: float


@dataclass
class Task:
    task_id: bytes
    client: bytes
    header: P.TaskHeader
    header_bytes: bytes
    input_blob: bytes
    env_key: tuple[Any, ...]
    queued_at: float
    queue_deadline: float
    worker: bytes | None = None
    retries_left: int = 0
    streamed: bool = False
    cancelled: bool = False


class RunnableStore:
    """Runnable bytes by digest, least recently used dropped first past a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._blobs: OrderedDict[str, bytes] = OrderedDict()

    def put(self, digest: str, blob: bytes) -> None:
        if digest in self._blobs:
            self._blobs.move_to_end(digest)
            return
        self._blobs[digest] = blob
        self.size += len(blob)
        while self.size > self.max_bytes and len(self._blobs) > 1:
            _, dropped = self._blobs.popitem(last=False)
            self.size -= len(dropped)

    def get(self, digest: str) -> bytes | None:
        blob = self._blobs.get(digest)
        if blob is not None:
            self._blobs.move_to_end(digest)
        return blob

    def __len__(self) -> int:
        return len(self._blobs)


def _env_key(environment: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(environment.get(key) for key in P.COMPATIBILITY_KEYS)


class Broker:
    """Serve until :meth:`stop`; see ``runnable-k8s broker --help`` for the knobs."""

    def __init__(
        self,
        bind: str = defaults.BROKER_BIND,
        *,
        keys: BrokerKeys | None = None,
        insecure: bool = False,
        max_message_bytes: int = defaults.MAX_MESSAGE_BYTES,
        queue_size: int = defaults.QUEUE_SIZE,
        queue_timeout: float = defaults.QUEUE_TIMEOUT,
        runnable_store_bytes: int = defaults.RUNNABLE_STORE_BYTES,
    ) -> None:
        if keys is None and not insecure and not is_loopback_endpoint(bind):
            raise BrokerConfigError(
                f"refusing to listen on {bind} without CurveZMQ keys: anyone who can reach this "
                "port could run arbitrary code on the workers. Create keys with `runnable-k8s keys "
                "DIR` and pass --keys DIR, bind to 127.0.0.1, or pass --insecure if the network is "
                "already private."
            )
        self.requested_bind = bind
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.workers: dict[bytes, WorkerState] = {}
        self.clients: dict[bytes, ClientState] = {}
        self.tasks: dict[bytes, Task] = {}
        self.queue: deque[Task] = deque()
        self.runnables = RunnableStore(runnable_store_bytes)
        self.counters: dict[str, int] = dict.fromkeys(
            ("submitted", "done", "failed", "cancelled", "retried", "workers_lost", "malformed", "refused"), 0
        )
        self.started_at = time.time()
        # Optional observers (autoscaler, metrics): called with status() every tick, and at once
        # when a task arrives at a pool without workers (so a pool scaled to zero wakes without
        # waiting for the tick). They must not block: the autoscaler hands work to its own thread.
        self.status_hooks: list[Callable[[dict[str, Any]], None]] = []
        self.latency_hook: Callable[[float], None] | None = None  # seconds from SUBMIT to RESULT
        self._running = False
        self._context = zmq.Context()
        self._authenticator = None
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = 1  # an unroutable peer raises instead of vanishing silently
        self.socket.sndhwm = 0  # never drop a RESULT because a client is slow to read
        self.socket.rcvhwm = 0
        # The application-level limit answers politely; this one protects memory from a peer that
        # ignores it (libzmq drops such a connection).
        self.socket.maxmsgsize = max_message_bytes + 1024 * 1024
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._authenticator = ThreadAuthenticator(self._context)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=str(keys.authorized_dir))
            self.socket.curve_secretkey = keys.secret
            self.socket.curve_publickey = keys.public
            self.socket.curve_server = True
        self.endpoint = self._bind(bind)

    def _bind(self, bind: str) -> str:
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise BrokerConfigError(f"cannot listen on {bind}: {exc}") from exc
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ loop

    def serve_forever(self) -> None:
        self._running = True
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        next_tick = time.monotonic() + P.HEARTBEAT_INTERVAL
        log.info("broker listening on %s", self.endpoint)
        while self._running:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            if poller.poll(min(timeout_ms, 250)):
                # Drain what is there before ticking, so a busy broker still ticks on time.
                for _ in range(1000):
                    try:
                        frames = self._recv()
                    except zmq.Again:
                        break
                    self._handle_safely(frames)
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + P.HEARTBEAT_INTERVAL
        log.info("broker stopped")

    def _recv(self) -> list[Any]:
        """One message as bytes, except the protocol frame, kept as a Frame for its CURVE User-Id."""
        recv, get = self.socket.recv, self.socket.get  # not .rcvmore: 4x dearer, 5 times a message
        frames: list[Any] = [recv(zmq.NOBLOCK)]
        if get(_RCVMORE):
            frames.append(recv(copy=False))
            while get(_RCVMORE):
                frames.append(recv())
        return frames

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._running = False

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def _handle_safely(self, raw: list[Any]) -> None:
        try:
            self._handle(raw)
        except Exception:  # noqa: BLE001 - one bad message must not stop the pool
            self.counters["malformed"] += 1
            log.warning("dropped a message that could not be handled", exc_info=True)

    def _handle(self, raw: list[Any]) -> None:
        if len(raw) < 3:
            self.counters["malformed"] += 1
            log.warning("dropped a message of %d frames (too short)", len(raw))
            return
        identity, header, command, body = raw[0], raw[1].bytes, raw[2], raw[3:]
        if header != P.PROTOCOL:
            self.counters["malformed"] += 1
            if header.startswith(P.PROTOCOL_FAMILY):
                self._send(identity, P.error_frames(b"", P.E_INCOMPATIBLE, (
                    f"this broker speaks {P.PROTOCOL.decode()} but the peer sent "
                    f"{header.decode(errors='replace')}; use the same runnable-k8s release on both"
                )))
            else:
                log.warning("dropped a message that is not runnable-k8s protocol")
            return
        handler = self._handlers.get(command)
        if handler is None:
            self.counters["malformed"] += 1
            log.warning("dropped unknown command %r", command[:16])
            return
        handler(self, identity, body, raw[1])

    # ------------------------------------------------------------------ clients

    def _on_hello(self, client: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        environment = P.decode_json_object(body[0]) if body else {}
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(client, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"client protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}"
            )))
            return
        self.clients[client] = ClientState(client, environment, _env_key(environment), self._expiry())
        self._send(client, [P.PROTOCOL, P.WELCOME, P.encode_json(self._info())])

    def _on_submit(self, client: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        if len(body) != 4:
            raise ValueError(f"SUBMIT has {len(body)} body frames, expected 4")
        task_id, header_bytes, runnable, input_blob = body
        state = self.clients.get(client)
        if state is None:
            self._send(client, P.error_frames(task_id, P.E_HELLO_REQUIRED, "say HELLO first"))
            return
        state.expiry = self._expiry()
        size = len(header_bytes) + len(runnable) + len(input_blob)
        if size > self.max_message_bytes:
            self._fail(client, task_id, P.E_PAYLOAD_TOO_LARGE, (
                f"task is {size} bytes, over this broker's limit of {self.max_message_bytes}; "
                "send smaller inputs or start the broker with a larger --max-message-bytes"
            ))
            return
        try:
            header = P.TaskHeader.from_bytes(header_bytes)
        except ValueError as exc:
            self._fail(client, task_id, P.E_BAD_REQUEST, f"bad task header: {exc}")
            return
        if len(task_id) != P.TASK_ID_BYTES or task_id in self.tasks:
            self._fail(client, task_id, P.E_BAD_REQUEST, "task id must be 16 new random bytes")
            return
        if runnable:
            if content_digest(runnable) != header.digest:
                self._fail(client, task_id, P.E_BAD_REQUEST, "runnable bytes do not match their digest")
                return
            self.runnables.put(header.digest, runnable)
        elif self.runnables.get(header.digest) is None:
            self._send(client, P.error_frames(task_id, P.E_NEED_RUNNABLE, "send the runnable again"))
            return
        if len(self.queue) >= self.queue_size:
            self._fail(client, task_id, P.E_QUEUE_FULL, (
                f"the broker's queue is full ({self.queue_size} tasks waiting); retry later or add "
                "workers (runnable-k8s scale)"
            ))
            return
        problem = self._incompatible_with_all(state)
        if problem:
            self._fail(client, task_id, P.E_INCOMPATIBLE, problem)
            return
        now = time.monotonic()
        queue_timeout = self.queue_timeout if header.timeout is None else min(self.queue_timeout, header.timeout)
        task = Task(task_id, client, header, header_bytes, input_blob, state.env_key, now, now + queue_timeout,
                    retries_left=header.retries)
        self.tasks[task_id] = task
        self.queue.append(task)
        self.counters["submitted"] += 1
        self._dispatch()
        if not self.workers and self.status_hooks:  # wake a pool scaled to zero now, not at the tick
            self._run_status_hooks()

    def _fail(self, client: bytes, task_id: bytes, code: bytes, message: str) -> None:
        """Refuse a submitted task: tell its client why (a bad request also counts as malformed)."""
        self.counters["malformed" if code == P.E_BAD_REQUEST else "refused"] += 1
        log.info("refused task %s: %s", task_id.hex()[:8], message)
        self._send(client, P.error_frames(task_id, code, message))

    def _incompatible_with_all(self, client: ClientState) -> str | None:
        """A reason to refuse at once: workers exist but none can run this client's objects."""
        if not self.workers or any(w.env_key == client.env_key for w in self.workers.values()):
            return None
        some_worker = next(iter(self.workers.values()))
        reason = P.incompatibility(client.environment, some_worker.environment)
        return f"no worker can run tasks from this client: {reason}. Rebuild the worker image to match."

    def _on_cancel(self, client: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        task = self.tasks.get(body[0]) if body else None
        if task is None or task.client != client:
            return  # already finished: nothing to cancel
        self._cancel(task)

    def _cancel(self, task: Task) -> None:
        self.counters["cancelled"] += 1
        if task.worker is None:
            self.queue.remove(task)
            del self.tasks[task.task_id]
        elif not task.cancelled:
            task.cancelled = True  # the slot stays busy until the worker confirms
            self._send(task.worker, [P.PROTOCOL, P.CANCEL, task.task_id])

    def _on_status(self, peer: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        self._send(peer, [P.PROTOCOL, P.STATUS, P.encode_json(self.status())])

    def _on_heartbeat(self, peer: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        if peer in self.workers:
            if not self.workers[peer].unreachable:
                self.workers[peer].expiry = self._expiry()
        elif peer in self.clients:
            self.clients[peer].expiry = self._expiry()
            self._send(peer, [P.PROTOCOL, P.HEARTBEAT])
        else:
            # Unknown: a worker or client from before a broker restart. Both re-introduce themselves.
            self._send(peer, [P.PROTOCOL, P.RECONNECT])

    def _on_bye(self, peer: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        if peer in self.workers:
            self._remove_worker(peer, "said goodbye")
        elif peer in self.clients:
            self._remove_client(peer)

    # ------------------------------------------------------------------ workers

    def _on_ready(self, worker: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        environment = P.decode_json_object(body[0]) if body else {}
        if self.keys is not None:  # with keys, only worker*.key files of authorized/ may serve tasks
            user = frame.get("User-Id")
            if user is None or user.encode() not in self.keys.worker_keys:
                self.counters["refused"] += 1
                log.warning("refused a worker whose key is not one of the %d worker*.key files in %s",
                            len(self.keys.worker_keys), self.keys.authorized_dir)
                self._send(worker, P.error_frames(b"", P.E_UNAUTHORIZED, (
                    "this key may not register as a worker: the broker accepts workers only with the keys "
                    "in its authorized/ folder named worker*.key"
                )))
                return
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(worker, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"worker protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}"
            )))
            return
        if worker in self.workers:
            self._remove_worker(worker, "re-registered")
        slots = max(1, int(environment.get("concurrency", 1)))
        self.workers[worker] = WorkerState(
            worker, environment, _env_key(environment), slots, self._expiry(),
            cache_size=max(1, int(environment.get("cache_size", 64))),
        )
        log.info("worker %s ready with %d slots (pid %s on %s)", worker.hex()[-8:], slots,
                 environment.get("pid"), environment.get("host"))
        self._send(worker, [P.PROTOCOL, P.WELCOME, P.encode_json(self._info())])
        self._dispatch()

    def _from_known_worker(self, worker: bytes) -> WorkerState | None:
        state = self.workers.get(worker)
        if state is None:
            self._send(worker, [P.PROTOCOL, P.RECONNECT])
            return None
        if not state.unreachable:
            state.expiry = self._expiry()
        return state

    def _task_of(self, worker: bytes, body: list[bytes]) -> Task | None:
        task = self.tasks.get(body[0]) if body else None
        if task is None or task.worker != worker:
            return None  # a late reply for a task that was cancelled or reassigned
        return task

    def _on_chunk(self, worker: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        if self._from_known_worker(worker) is None:
            return
        task = self._task_of(worker, body)
        if task is not None and not task.cancelled:
            task.streamed = True
            self._send(task.client, [P.PROTOCOL, P.CHUNK, task.task_id, body[1]])

    def _on_result(self, worker: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        if self._from_known_worker(worker) is None:
            return
        task = self._task_of(worker, body)
        if task is None:
            return
        if not task.cancelled:  # reply first, then refill the slot
            self.counters["done"] += 1
            self._send(task.client, [P.PROTOCOL, P.RESULT, task.task_id, body[1]])
            if self.latency_hook is not None:
                self.latency_hook(time.monotonic() - task.queued_at)
        self._finish(task)

    def _on_error(self, worker: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        state = self._from_known_worker(worker)
        if state is None:
            return
        if not body or not body[0]:
            log.warning("worker %s reported: %s", worker.hex()[-8:], body[2:3])
            return
        task = self._task_of(worker, body)
        if task is None:
            return
        code = body[1]
        if code == P.E_NEED_RUNNABLE:
            state.runnables.pop(task.header.digest, None)
            blob = self.runnables.get(task.header.digest)
            if blob is not None:
                self._send_task(state, task, blob)
                return
            self._finish(task)
            self._send(task.client, P.error_frames(task.task_id, P.E_NEED_RUNNABLE, "send the runnable again"))
            return
        self._finish(task)
        if code == P.E_REQUEUE and not task.cancelled:
            self._requeue(task)
            return
        if task.cancelled:
            return
        self.counters["failed"] += 1
        self._send(task.client, [P.PROTOCOL, P.ERROR, *body])

    def _on_draining(self, worker: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        state = self._from_known_worker(worker)
        if state is not None:
            state.draining = True
            log.info("worker %s is draining (%d tasks left)", worker.hex()[-8:], len(state.running))

    # ------------------------------------------------------------------ scheduling

    def _dispatch(self) -> None:
        """Give queued tasks, oldest first, to workers with free slots."""
        if not self.queue:
            return
        free = [w for w in self.workers.values() if not w.draining and len(w.running) < w.slots]
        if not free:
            return
        for task in list(self.queue):
            candidates = [
                Candidate(w.identity, w.slots, len(w.running), task.header.digest in w.runnables, w.last_assigned)
                for w in free
                if w.env_key == task.env_key
            ]
            chosen = choose_worker(candidates)
            if chosen is None:
                continue
            state = self.workers[chosen]
            blob = b"" if task.header.digest in state.runnables else self.runnables.get(task.header.digest)
            if blob is None:  # evicted from the store while queued: the client sends it again
                self.queue.remove(task)
                del self.tasks[task.task_id]
                self._send(task.client, P.error_frames(task.task_id, P.E_NEED_RUNNABLE, "send the runnable again"))
                continue
            self.queue.remove(task)
            task.worker = chosen
            state.running.add(task.task_id)
            state.last_assigned = time.monotonic()
            self._send_task(state, task, blob)
            if state.unreachable:  # the task went back to the queue: start over without this worker
                self._dispatch()
                return
            if len(state.running) >= state.slots:
                free.remove(state)
                if not free:
                    return

    def _send_task(self, worker: WorkerState, task: Task, blob: bytes) -> None:
        header_bytes = task.header_bytes
        waited = time.monotonic() - task.queued_at
        if task.header.timeout is not None and waited > 0.01:  # the worker gets the time that is left
            header = task.header
            header_bytes = P.TaskHeader(header.kind, header.digest, max(0.001, header.timeout - waited),
                                        header.retries, header.config).to_bytes()
        if blob:
            worker.remember(task.header.digest)
        try:
            P.send_frames(self.socket, [worker.identity, P.PROTOCOL, P.TASK, task.task_id, header_bytes, blob,
                                        task.input_blob])
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            # The worker vanished (without a BYE) before the task reached it: the task never
            # started, so it goes back to the front of the queue for another worker.
            log.info("worker %s is gone; task %s goes back to the queue", worker.identity.hex()[-8:],
                     task.task_id.hex()[:8])
            worker.running.discard(task.task_id)
            task.worker = None
            self.queue.appendleft(task)
            self._worker_unreachable(worker.identity)

    def _finish(self, task: Task) -> None:
        self.tasks.pop(task.task_id, None)
        worker = self.workers.get(task.worker) if task.worker else None
        if worker is not None:
            worker.running.discard(task.task_id)
        task.worker = None
        self._dispatch()

    def _requeue(self, task: Task) -> None:
        self.tasks[task.task_id] = task
        self.queue.appendleft(task)
        self._dispatch()

    # ------------------------------------------------------------------ liveness

    def _expiry(self) -> float:
        return time.monotonic() + P.HEARTBEAT_EXPIRY

    def _tick(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.expiry < now:
                self._remove_worker(worker.identity, "disconnected" if worker.unreachable else "stopped heartbeating")
            elif not worker.unreachable:
                self._send(worker.identity, [P.PROTOCOL, P.HEARTBEAT])
        for client in list(self.clients.values()):
            if client.expiry < now:
                self._remove_client(client.identity)
        # Queue deadlines are not in queue order when calls have different timeouts: check them all.
        expired = [t for t in self.queue if t.queue_deadline < now] if self.queue else []
        if expired:
            self.queue = deque(t for t in self.queue if t.queue_deadline >= now)
        for task in expired:
            del self.tasks[task.task_id]
            self.counters["failed"] += 1
            waiting = "no workers are connected" if not self.workers else "every worker slot stayed busy"
            self._send(task.client, P.error_frames(task.task_id, P.E_QUEUE_TIMEOUT, (
                f"the task waited {now - task.queued_at:.1f}s in the broker's queue and {waiting}; "
                "add workers (runnable-k8s scale) or raise the call's timeout"
            )))
        if self.status_hooks:
            self._run_status_hooks()

    def _run_status_hooks(self) -> None:
        status = self.status()
        for hook in self.status_hooks:
            try:
                hook(status)
            except Exception:  # noqa: BLE001 - an observer must not stop the pool
                log.warning("a status hook failed", exc_info=True)

    def _worker_unreachable(self, identity: bytes) -> None:
        """A send to this worker failed: its connection is gone. What it sent before leaving (its
        last results, its BYE) may still be waiting to be read, so it is not removed at once: it
        gets no more tasks, its BYE removes it, or else the next tick does (its tasks then fail)."""
        worker = self.workers[identity]
        if not worker.unreachable:
            log.info("worker %s is unreachable", identity.hex()[-8:])
        worker.unreachable = True
        worker.draining = True
        worker.expiry = min(worker.expiry, time.monotonic())

    def _remove_worker(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        if why != "said goodbye":
            self.counters["workers_lost"] += 1
        log.log(logging.INFO if why == "said goodbye" else logging.WARNING, "worker %s removed: %s (%d tasks running)",
                identity.hex()[-8:], why, len(worker.running))
        for task_id in list(worker.running):
            task = self.tasks.get(task_id)
            if task is None:
                continue
            task.worker = None
            if task.cancelled:
                del self.tasks[task_id]
            elif why == "said goodbye" and not task.streamed:
                # A worker answers every task it received before its BYE, so this one was still
                # on its way when the worker left and never started: another worker runs it.
                self.queue.appendleft(task)
            elif task.retries_left > 0 and not task.streamed:
                task.retries_left -= 1
                self.counters["retried"] += 1
                self.queue.appendleft(task)
            else:
                del self.tasks[task_id]
                self.counters["failed"] += 1
                self._send(task.client, P.error_frames(task_id, P.E_WORKER_LOST, (
                    f"the worker running this task {why} (pid {worker.environment.get('pid')} on "
                    f"{worker.environment.get('host')}); retry the call, or pass retries=N to "
                    "RunnableK8s to retry automatically"
                )))
        self._dispatch()

    def _remove_client(self, identity: bytes) -> None:
        self.clients.pop(identity, None)
        for task in [t for t in self.tasks.values() if t.client == identity]:
            self._cancel(task)

    # ------------------------------------------------------------------ output

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            P.send_frames(self.socket, [identity, *frames])
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            log.info("peer %s is gone; dropped a %s", identity.hex()[-8:], P.COMMAND_NAMES.get(frames[1], "?"))
            if identity in self.workers:
                self._worker_unreachable(identity)
            elif identity in self.clients:
                self._remove_client(identity)

    def _info(self) -> dict[str, Any]:
        return {
            "protocol": P.PROTOCOL_VERSION,
            "max_message_bytes": self.max_message_bytes,
            "heartbeat_interval": P.HEARTBEAT_INTERVAL,
        }

    def status(self) -> dict[str, Any]:
        """The numbers ``runnable-k8s status`` prints (and the autoscaler reads)."""
        workers = [
            {
                "id": w.identity.hex()[-8:],
                "pid": w.environment.get("pid"),
                "host": w.environment.get("host"),
                "slots": w.slots,
                "busy": len(w.running),
                "draining": w.draining,
                "cached_runnables": len(w.runnables),
            }
            for w in self.workers.values()
        ]
        return {
            "endpoint": self.endpoint,
            "uptime_s": round(time.time() - self.started_at, 1),
            "workers": workers,
            "slots": sum(w.slots for w in self.workers.values() if not w.draining),
            "busy": sum(len(w.running) for w in self.workers.values()),
            "queued": len(self.queue),
            "clients": len(self.clients),
            "runnables_stored": len(self.runnables),
            "counters": dict(self.counters),
        }

    _handlers = {
        P.HELLO: _on_hello,
        P.SUBMIT: _on_submit,
        P.CANCEL: _on_cancel,
        P.STATUS: _on_status,
        P.HEARTBEAT: _on_heartbeat,
        P.BYE: _on_bye,
        P.READY: _on_ready,
        P.CHUNK: _on_chunk,
        P.RESULT: _on_result,
        P.ERROR: _on_error,
        P.DRAINING: _on_draining,
    }
