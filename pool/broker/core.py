"""Every rule of the broker, without sockets or clocks: events in, messages out.

``BrokerCore.handle(event, now)`` applies one event (``events``) to the state (``state``) and
returns the effects to carry out, mostly ``Send(peer, frames)``. The time is an argument, so a
test can expire a worker or a queued task by passing a later ``now``, in microseconds, with no
process, socket or sleep (tests/test_broker_core.py); the socket loop (``server``) is then only a
translator. The model is h11 and dask's worker state machine; the rules are DESIGN §4 and §5.

Cost: a task is queued by its environment key and handed out oldest first from that queue only;
one dispatch compares the free workers of that environment, never the queue. Tasks that leave
the queue early are marked and skipped (see ``state.Queues``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pool.broker import events as E
from pool.broker.scheduling import Candidate, choose_worker
from pool.broker.state import ClientState, EnvKey, Queues, RunnableStore, Task, WorkerState, env_key
from worker import defaults
from worker import protocol as P

log = logging.getLogger("runnable_k8s.broker")

COUNTERS = ("submitted", "done", "failed", "cancelled", "retried", "workers_lost", "malformed", "refused",
            "runnable_bytes_received", "slots_clamped", "clients_dropped", "peers_revoked")
NEED_RUNNABLE_MESSAGE = "send the runnable again"
# A task that waited less than this is sent with its header untouched (re-encoding costs more
# than the worker's deadline loses).
_RETIME_AFTER = 0.01


class BrokerCore:
    """The broker's state and rules. Not thread-safe: one loop owns it."""

    def __init__(
        self,
        *,
        now: float,
        endpoint: str = "",
        max_message_bytes: int = defaults.MAX_MESSAGE_BYTES,
        queue_size: int = defaults.QUEUE_SIZE,
        queue_timeout: float = defaults.QUEUE_TIMEOUT,
        runnable_store_bytes: int = defaults.RUNNABLE_STORE_BYTES,
        client_keys: frozenset[bytes] | None = None,
        worker_keys: frozenset[bytes] | None = None,
        client_keys_dir: str = "",
        worker_keys_dir: str = "",
        max_worker_slots: int = defaults.MAX_WORKER_SLOTS,
        queue_bytes: int = defaults.QUEUE_BYTES,
        client_queue_size: int = defaults.CLIENT_QUEUE_SIZE,
        client_queue_bytes: int = defaults.CLIENT_QUEUE_BYTES,
    ) -> None:
        """``client_keys`` / ``worker_keys``: the Z85 public keys allowed to say HELLO / READY
        (None: any peer, for a broker without CurveZMQ); the folders only name them in refusals.
        ``max_worker_slots``: the most slots a worker gets, whatever its READY claims.
        ``queue_size``/``queue_bytes`` bound what all clients' tasks hold in the broker,
        ``client_queue_size``/``client_queue_bytes`` what one client's do."""
        if max_worker_slots < 1:
            raise ValueError("max_worker_slots must be 1 or more")
        if min(queue_size, queue_bytes, client_queue_size, client_queue_bytes) < 1:
            raise ValueError("queue sizes and byte budgets must be 1 or more")
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.client_keys = client_keys
        self.worker_keys = worker_keys
        self.client_keys_dir = client_keys_dir
        self.worker_keys_dir = worker_keys_dir
        self.queue_bytes = queue_bytes
        self.client_queue_size = client_queue_size
        self.client_queue_bytes = client_queue_bytes
        self.held_bytes = 0  # input bytes of all tasks held (queued or running)
        # Numbers of the socket side (the outbox), refreshed by the loop every tick, so that a
        # STATUS answer shows them without the core reaching into I/O.
        self.io_status: dict[str, Any] = {}
        self.max_worker_slots = max_worker_slots
        self.started_at = now
        self.now = now
        self.workers: dict[bytes, WorkerState] = {}
        self.clients: dict[bytes, ClientState] = {}
        self.tasks: dict[bytes, Task] = {}
        self.queues = Queues()
        self.runnables = RunnableStore(runnable_store_bytes)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # Workers that take tasks now (not draining, a slot free), by environment: dispatch looks
        # only here. Insertion order is assignment order, so exact ties go to the least recent.
        self._free: dict[EnvKey, dict[bytes, WorkerState]] = {}
        self._workers_by_env: Counter[EnvKey] = Counter()
        self._out: list[E.Effect] = []

    @property
    def queued(self) -> int:
        return len(self.queues)

    def handle(self, event: E.Event, now: float) -> list[E.Effect]:
        """Apply one event at time ``now`` (monotonic seconds); return what to send, in order."""
        self.now = now
        out: list[E.Effect] = []
        self._out = out
        try:
            self._rules[event.__class__](self, event)
        except Exception:  # one bad message must not stop the pool
            self.counters["malformed"] += 1
            log.warning("dropped a message that could not be handled: %s", type(event).__name__, exc_info=True)
        return out

    def _send(self, peer: bytes, frames: list[bytes]) -> None:
        self._out.append(E.Send(peer, frames))

    def _expiry(self) -> float:
        return self.now + P.HEARTBEAT_EXPIRY

    # ------------------------------------------------------------------ malformed input

    def _on_malformed(self, event: E.Malformed) -> None:
        self.counters["malformed"] += 1
        log.warning("dropped %s from %s", event.reason, event.peer.hex()[-8:])

    def _on_foreign_protocol(self, event: E.ForeignProtocol) -> None:
        self.counters["malformed"] += 1
        self._send(event.peer, P.error_frames(b"", P.E_INCOMPATIBLE, (
            f"this broker speaks {P.PROTOCOL.decode()} but the peer sent "
            f"{event.protocol.decode(errors='replace')}; use the same runnable-k8s release on both"
        )))

    # ------------------------------------------------------------------ clients

    def _on_hello(self, event: E.Hello) -> None:
        environment = event.environment
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(event.peer, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"client protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}"
            )))
            return
        key = self._allowed_key(event.user_id, self.client_keys)
        if key is False:
            self.counters["refused"] += 1
            log.warning("refused a client whose key is not in the client allow-list %s", self.client_keys_dir)
            self._send(event.peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this key may not connect as a client: the broker accepts clients only with the public keys in "
                "its clients/ allow-list (add one with `runnable-k8s keys DIR --client NAME`)"
            )))
            return
        known = self.clients.get(event.peer)
        self.clients[event.peer] = ClientState(
            event.peer, environment, env_key(environment), self._expiry(),
            known.tasks if known is not None else set(), key, known.held_bytes if known is not None else 0)
        self._send(event.peer, [P.PROTOCOL, P.WELCOME, P.encode_json(self.info())])

    def _on_submit(self, event: E.Submit) -> None:
        client, task_id, runnable = event.peer, event.task_id, event.runnable
        self.counters["runnable_bytes_received"] += len(runnable)
        state = self.clients.get(client)
        if state is None:
            self._send(client, P.error_frames(task_id, P.E_HELLO_REQUIRED, "say HELLO first"))
            return
        state.expiry = self._expiry()
        size = len(event.header) + len(runnable) + len(event.input_blob)
        if size > self.max_message_bytes:
            self._refuse(client, task_id, P.E_PAYLOAD_TOO_LARGE, (
                f"task is {size} bytes, over this broker's limit of {self.max_message_bytes}; "
                "send smaller inputs or start the broker with a larger --max-message-bytes"
            ))
            return
        try:
            header = P.TaskHeader.from_bytes(event.header)
        except ValueError as exc:
            self._refuse(client, task_id, P.E_BAD_REQUEST, f"bad task header: {exc}")
            return
        if len(task_id) != P.TASK_ID_BYTES or task_id in self.tasks:
            self._refuse(client, task_id, P.E_BAD_REQUEST, "task id must be 16 new random bytes")
            return
        if runnable:
            if P.content_digest(runnable) != header.digest:
                self._refuse(client, task_id, P.E_BAD_REQUEST, "runnable bytes do not match their digest")
                return
            self.runnables.put(header.digest, runnable)
        elif self.runnables.get(header.digest) is None:
            self._send(client, P.error_frames(task_id, P.E_NEED_RUNNABLE, NEED_RUNNABLE_MESSAGE))
            return
        full = self._over_budget(state, client, len(event.header) + len(event.input_blob))
        if full:
            self._refuse(client, task_id, P.E_QUEUE_FULL, full)
            return
        problem = self._incompatible_with_all(state)
        if problem:
            self._refuse(client, task_id, P.E_INCOMPATIBLE, problem)
            return
        now = self.now
        queue_timeout = self.queue_timeout if header.timeout is None else min(self.queue_timeout, header.timeout)
        task = Task(task_id, client, header, event.header, event.input_blob, state.env_key, now, now + queue_timeout,
                    retries_left=header.retries, size=len(event.header) + len(event.input_blob))
        self.tasks[task_id] = task
        state.tasks.add(task_id)
        state.held_bytes += task.size
        self.held_bytes += task.size
        self.counters["submitted"] += header.items
        free = self._free.get(task.env_key)
        if free:  # a free worker means nothing of this environment waits: skip the queue
            self._assign(task, free)
        else:
            self.queues.push(task)
        if not self.workers:
            self._out.append(E.WakeObservers())

    def _over_budget(self, state: ClientState, client: bytes, size: int) -> str | None:
        """Why one more task of ``size`` bytes would not fit, or None. A client's own limits come
        first, so a client at its limit learns it is its own backlog, not the pool's."""
        advice = "retry later, send fewer calls at once (max_concurrency), or add workers (runnable-k8s scale)"
        waiting = self.queues.of_client(client)
        if waiting >= self.client_queue_size:
            return (f"this client already has {waiting} tasks waiting in the broker's queue, its limit "
                    f"(--client-queue-size {self.client_queue_size}); {advice}")
        if state.held_bytes and state.held_bytes + size > self.client_queue_bytes:
            return (f"this client's tasks already hold {state.held_bytes} bytes of input in the broker; one "
                    f"more of {size} bytes would pass its limit (--client-queue-bytes {self.client_queue_bytes}); "
                    f"{advice}")
        if len(self.queues) >= self.queue_size:
            return f"the broker's queue is full ({self.queue_size} tasks waiting); {advice}"
        if self.held_bytes and self.held_bytes + size > self.queue_bytes:
            return (f"the broker holds {self.held_bytes} bytes of task input, its limit (--queue-bytes "
                    f"{self.queue_bytes}); {advice}")
        return None

    @staticmethod
    def _allowed_key(user_id: str | None, allowed: frozenset[bytes] | None) -> bytes | Literal[False] | None:
        """The peer's key when it is allowed, None when keys are off, False when it is refused."""
        if allowed is None:
            return None
        key = user_id.encode() if user_id is not None else None
        return key if key is not None and key in allowed else False

    def _refuse(self, client: bytes, task_id: bytes, code: bytes, message: str) -> None:
        """Tell a client why its task will not run (a bad request also counts as malformed)."""
        self.counters["malformed" if code == P.E_BAD_REQUEST else "refused"] += 1
        log.info("refused task %s: %s", task_id.hex()[:8], message)
        self._send(client, P.error_frames(task_id, code, message))

    def _incompatible_with_all(self, client: ClientState) -> str | None:
        """A reason to refuse at once: workers exist but none can run this client's objects."""
        if not self.workers or self._workers_by_env[client.env_key]:
            return None
        some_worker = next(iter(self.workers.values()))
        reason = P.incompatibility(client.environment, some_worker.environment)
        return f"no worker can run tasks from this client: {reason}. Rebuild the worker image to match."

    def _on_cancel(self, event: E.Cancel) -> None:
        task = self.tasks.get(event.task_id)
        if task is None or task.client != event.peer:
            return  # already finished: nothing to cancel
        self._cancel(task)

    def _cancel(self, task: Task) -> None:
        self.counters["cancelled"] += task.header.items - task.reported
        if task.worker is None:
            self.queues.discard(task)
            self._forget(task)
        elif not task.cancelled:
            task.cancelled = True  # the slot stays busy until the worker confirms
            self._send(task.worker, [P.PROTOCOL, P.CANCEL, task.task_id])

    def _on_status(self, event: E.StatusRequest) -> None:
        self._send(event.peer, [P.PROTOCOL, P.STATUS, P.encode_json(self.status(self.now))])

    def _on_heartbeat(self, event: E.Heartbeat) -> None:
        peer = event.peer
        worker = self.workers.get(peer)
        if worker is not None:
            if not worker.unreachable:
                worker.expiry = self._expiry()
        elif peer in self.clients:
            self.clients[peer].expiry = self._expiry()
            self._send(peer, [P.PROTOCOL, P.HEARTBEAT])
        else:
            # Unknown: a worker or client from before a broker restart. Both re-introduce themselves.
            self._send(peer, [P.PROTOCOL, P.RECONNECT])

    def _on_bye(self, event: E.Bye) -> None:
        if event.peer in self.workers:
            self._remove_worker(event.peer, "said goodbye")
        elif event.peer in self.clients:
            self._remove_client(event.peer)
        self._out.append(E.Forget(event.peer))

    def _remove_client(self, identity: bytes) -> None:
        state = self.clients.pop(identity, None)
        if state is None:
            return
        for task_id in list(state.tasks):
            task = self.tasks.get(task_id)
            if task is not None:
                self._cancel(task)

    # ------------------------------------------------------------------ workers

    def _on_ready(self, event: E.Ready) -> None:
        worker, environment = event.peer, event.environment
        # With keys, only the keys of the worker allow-list may serve tasks (a client key may not).
        key = self._allowed_key(event.user_id, self.worker_keys)
        if key is False:
            self.counters["refused"] += 1
            log.warning("refused a worker whose key is not one of the %d keys in the worker allow-list %s",
                        len(self.worker_keys or ()), self.worker_keys_dir)
            self._send(worker, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this key may not register as a worker: the broker accepts workers only with the public "
                "keys in its workers/ allow-list (the worker folder of `runnable-k8s keys DIR`)"
            )))
            return
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(worker, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"worker protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}"
            )))
            return
        slots = max(1, int(environment.get("concurrency", 1)))  # a ValueError here is a malformed READY
        if slots > self.max_worker_slots:  # a worker's word is not trusted beyond the cap
            self.counters["slots_clamped"] += 1
            log.warning("worker %s (pid %s on %s) claimed %d slots; it gets %d (--max-worker-slots)",
                        worker.hex()[-8:], environment.get("pid"), environment.get("host"), slots,
                        self.max_worker_slots)
            slots = self.max_worker_slots
        cache_size = max(1, int(environment.get("cache_size", 64)))
        if worker in self.workers:
            self._remove_worker(worker, "re-registered")
        state = WorkerState(worker, environment, env_key(environment), slots, self._expiry(), cache_size=cache_size,
                            key=key)
        self.workers[worker] = state
        self._workers_by_env[state.env_key] += 1
        self._refresh(state)
        log.info("worker %s ready with %d slots (pid %s on %s)", worker.hex()[-8:], slots,
                 environment.get("pid"), environment.get("host"))
        self._send(worker, [P.PROTOCOL, P.WELCOME, P.encode_json(self.info())])
        self._dispatch(state.env_key)

    def _known_worker(self, worker: bytes) -> WorkerState | None:
        """The worker's state (its message proves it alive), or None after asking it to READY again."""
        state = self.workers.get(worker)
        if state is None:
            self._send(worker, [P.PROTOCOL, P.RECONNECT])
            return None
        if not state.unreachable:
            state.expiry = self._expiry()
        return state

    def _task_of(self, worker: bytes, task_id: bytes) -> Task | None:
        task = self.tasks.get(task_id)
        if task is None or task.worker != worker:
            return None  # a late reply for a task that was cancelled or reassigned
        return task

    def _on_chunk(self, event: E.Chunk) -> None:
        if self._known_worker(event.peer) is None:
            return
        task = self._task_of(event.peer, event.task_id)
        if task is not None and not task.cancelled:
            task.streamed = True
            if task.header.kind == "batch":
                self._count_item(task, event.chunk)
            self._send(task.client, [P.PROTOCOL, P.CHUNK, task.task_id, event.chunk])

    def _on_callback_event(self, event: E.CallbackEvent) -> None:
        """Forwarded like a chunk, but it does not count as streamed: a task that only reported
        callbacks before its worker died may still be retried (its handlers then see the lost
        attempt's runs start without an end, and the retry's runs start afresh)."""
        if self._known_worker(event.peer) is None:
            return
        task = self._task_of(event.peer, event.task_id)
        if task is not None and not task.cancelled and task.header.events:
            self._send(task.client, [P.PROTOCOL, P.EVENT, task.task_id, event.data])

    def _on_result(self, event: E.Result) -> None:
        if self._known_worker(event.peer) is None:
            return
        task = self._task_of(event.peer, event.task_id)
        if task is None:
            return
        if not task.cancelled:  # reply first, then refill the slot
            if task.header.kind == "batch":  # its items were counted one by one
                self.counters["failed"] += task.header.items - task.reported
            else:
                self.counters["done"] += 1
            self._send(task.client, [P.PROTOCOL, P.RESULT, task.task_id, event.output])
            self._out.append(E.Latency(self.now - task.queued_at))
        self._release(task)
        self._forget(task)

    def _on_error(self, event: E.WorkerError) -> None:
        state = self._known_worker(event.peer)
        if state is None:
            return
        if not event.task_id:
            log.warning("worker %s reported: %s", event.peer.hex()[-8:], event.body[2:3])
            return
        task = self._task_of(event.peer, event.task_id)
        if task is None:
            return
        if event.code == P.E_NEED_RUNNABLE:  # its cache dropped the runnable since we last sent it
            state.runnables.pop(task.header.digest, None)
            blob = self.runnables.get(task.header.digest)
            if blob is not None:
                self._send_task(state, task, blob)
                return
            self._release(task)
            self._forget(task)
            self._send(task.client, P.error_frames(task.task_id, P.E_NEED_RUNNABLE, NEED_RUNNABLE_MESSAGE))
            return
        self._release(task)
        if event.code == P.E_REQUEUE and not task.cancelled:  # a draining worker hands it back, unstarted
            self.queues.push(task, front=True)
            self._dispatch(task.env_key)
            return
        self._forget(task)
        if task.cancelled:
            return
        self.counters["failed"] += task.header.items - task.reported
        self._send(task.client, [P.PROTOCOL, P.ERROR, *event.body])

    def _count_item(self, task: Task, chunk: bytes) -> None:
        """Count a batch item as done or failed as it goes by (counters count calls, not tasks);
        a malformed one is the client's to refuse, and counts as nothing here."""
        try:
            failed = P.item_failed(chunk, task.header.items)
        except ValueError:
            return
        if task.reported < task.header.items:
            task.reported += 1
            self.counters["failed" if failed else "done"] += 1

    def _on_draining(self, event: E.Draining) -> None:
        state = self._known_worker(event.peer)
        if state is not None:
            state.draining = True
            self._refresh(state)
            log.info("worker %s is draining (%d tasks left)", event.peer.hex()[-8:], len(state.running))

    # ------------------------------------------------------------------ scheduling

    def _refresh(self, worker: WorkerState) -> None:
        """Keep the free-worker index true after the worker's load or standing changed."""
        free = self._free.get(worker.env_key)
        if worker.takes_tasks and self.workers.get(worker.identity) is worker:
            if free is None:
                free = self._free[worker.env_key] = {}
            free[worker.identity] = worker
        elif free is not None:
            free.pop(worker.identity, None)
            if not free:
                del self._free[worker.env_key]

    def _dispatch(self, key: EnvKey) -> None:
        """Give this environment's queued tasks, oldest first, to its workers with free slots."""
        free = self._free.get(key)
        while free:
            task = self.queues.pop(key)
            if task is None:
                return
            self._assign(task, free)
            free = self._free.get(key)

    def _assign(self, task: Task, free: dict[bytes, WorkerState]) -> None:
        """Send one task to the worker the policy picks among ``free`` (its environment's)."""
        digest = task.header.digest
        chosen = choose_worker([
            Candidate(w.identity, w.slots, w.busy, digest in w.runnables, w.last_assigned)
            for w in free.values()
        ])
        if chosen is None:
            raise AssertionError("every worker in the free index has a free slot")
        worker = free.pop(chosen)  # re-inserted last by _refresh: exact ties go to the least recent
        blob = b"" if digest in worker.runnables else self.runnables.get(digest)
        if blob is None:  # evicted from the store while queued: the client sends it again
            self._refresh(worker)
            self._forget(task)
            self._send(task.client, P.error_frames(task.task_id, P.E_NEED_RUNNABLE, NEED_RUNNABLE_MESSAGE))
            return
        task.worker = chosen
        worker.occupy(task.task_id, task.header.items)
        worker.last_assigned = self.now
        self._refresh(worker)
        self._send_task(worker, task, blob)

    def _send_task(self, worker: WorkerState, task: Task, blob: bytes) -> None:
        header, header_bytes = task.header, task.header_bytes
        waited = self.now - task.queued_at
        if header.timeout is not None and waited > _RETIME_AFTER:  # the worker gets the time that is left
            # replace(), not a new header: every other field (config, trust, ...) must reach the worker.
            header_bytes = dataclasses.replace(header, timeout=max(0.001, header.timeout - waited)).to_bytes()
        if blob:
            worker.remember(task.header.digest)
        self._send(worker.identity, [P.PROTOCOL, P.TASK, task.task_id, header_bytes, blob, task.input_blob])

    def _release(self, task: Task) -> None:
        """Free the task's slot and refill it."""
        worker = self.workers.get(task.worker) if task.worker else None
        task.worker = None
        if worker is not None:
            worker.vacate(task.task_id)
            self._refresh(worker)
            self._dispatch(worker.env_key)

    def _forget(self, task: Task) -> None:
        if self.tasks.pop(task.task_id, None) is None:
            return
        self.held_bytes -= task.size
        client = self.clients.get(task.client)
        if client is not None:
            client.tasks.discard(task.task_id)
            client.held_bytes -= task.size

    # ------------------------------------------------------------------ liveness

    def _on_tick(self, event: E.Tick) -> None:
        now = self.now
        for worker in list(self.workers.values()):
            if worker.expiry < now:
                self._remove_worker(worker.identity, "disconnected" if worker.unreachable else "stopped heartbeating")
                self._out.append(E.Forget(worker.identity))
            elif not worker.unreachable:
                self._send(worker.identity, [P.PROTOCOL, P.HEARTBEAT])
        for client in list(self.clients.values()):
            if client.expiry < now:
                self._remove_client(client.identity)
                self._out.append(E.Forget(client.identity))
        for task in self.queues.expired(now):
            self._forget(task)
            self.counters["failed"] += task.header.items - task.reported
            waiting = "no workers are connected" if not self.workers else "every worker slot stayed busy"
            self._send(task.client, P.error_frames(task.task_id, P.E_QUEUE_TIMEOUT, (
                f"the task waited {now - task.queued_at:.1f}s in the broker's queue and {waiting}; "
                "add workers (runnable-k8s scale) or raise the call's timeout"
            )))

    def _on_send_failed(self, event: E.SendFailed) -> None:
        peer, frames = event.peer, event.frames
        log.info("peer %s is gone; dropped a %s", peer.hex()[-8:], P.COMMAND_NAMES.get(frames[1], "?"))
        worker = self.workers.get(peer)
        if worker is not None:
            task = self.tasks.get(frames[2]) if frames[1] == P.TASK else None
            if task is not None and task.worker == peer:
                # The worker vanished (without a BYE) before the task reached it: the task never
                # started, so it goes back to the front of the queue for another worker.
                log.info("task %s goes back to the queue", task.task_id.hex()[:8])
                worker.vacate(task.task_id)
                task.worker = None
                self.queues.push(task, front=True)
            self._worker_unreachable(worker)
            self._dispatch(worker.env_key)
        elif peer in self.clients:
            self._remove_client(peer)

    def _on_peer_stalled(self, event: E.PeerStalled) -> None:
        peer = event.peer
        if peer in self.clients:
            self.counters["clients_dropped"] += 1
            log.warning("dropped client %s: %d bytes of replies wait for it and it does not read them; its "
                        "%d tasks are cancelled", peer.hex()[-8:], event.unread_bytes, len(self.clients[peer].tasks))
            self._remove_client(peer)
        elif peer in self.workers:
            log.warning("worker %s does not read what the broker sends (%d bytes wait)", peer.hex()[-8:],
                        event.unread_bytes)
            self._worker_unreachable(self.workers[peer])

    def _on_keys_changed(self, event: E.KeysChanged) -> None:
        """Take effect at once for peers already connected: CurveZMQ checks a key only at the
        handshake, so a revoked peer's open connection is closed off here."""
        self.client_keys, self.worker_keys = event.client_keys, event.worker_keys
        for client in [c for c in self.clients.values() if c.key is not None and c.key not in event.client_keys]:
            self.counters["peers_revoked"] += 1
            log.warning("client %s: its key was taken out of the allow-list; its %d tasks fail",
                        client.identity.hex()[-8:], len(client.tasks))
            self.clients.pop(client.identity)
            for task_id in list(client.tasks):
                task = self.tasks.get(task_id)
                if task is None:
                    continue
                self._send(client.identity, P.error_frames(task_id, P.E_UNAUTHORIZED, (
                    "this client's key was taken out of the broker's allow-list while the call ran"
                )))
                self._cancel(task)
        for worker in [w for w in self.workers.values() if w.key is not None and w.key not in event.worker_keys]:
            self.counters["peers_revoked"] += 1
            self._send(worker.identity, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this worker's key was taken out of the broker's allow-list"
            )))
            self._remove_worker(worker.identity, "had its key revoked")

    def _worker_unreachable(self, worker: WorkerState) -> None:
        """A send to this worker failed: its connection is gone. What it sent before leaving (its
        last results, its BYE) may still be waiting to be read, so it is not removed at once: it
        gets no more tasks, its BYE removes it, or else the next tick does (its tasks then fail)."""
        if not worker.unreachable:
            log.info("worker %s is unreachable", worker.identity.hex()[-8:])
        worker.unreachable = True
        worker.draining = True
        worker.expiry = min(worker.expiry, self.now)
        self._refresh(worker)

    def _remove_worker(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        self._workers_by_env[worker.env_key] -= 1
        if not self._workers_by_env[worker.env_key]:
            del self._workers_by_env[worker.env_key]
        self._refresh(worker)
        said_goodbye = why == "said goodbye"
        if not said_goodbye:
            self.counters["workers_lost"] += 1
        log.log(logging.INFO if said_goodbye else logging.WARNING, "worker %s removed: %s (%d tasks running)",
                identity.hex()[-8:], why, len(worker.running))
        running = [self.tasks[t] for t in worker.running if t in self.tasks]
        # Newest first, each to the front: the oldest ends up first in the queue again.
        for task in sorted(running, key=lambda t: t.queued_at, reverse=True):
            task.worker = None
            if task.cancelled:
                self._forget(task)
            elif said_goodbye and not task.streamed:
                # A worker answers every task it received before its BYE, so this one was still
                # on its way when the worker left and never started: another worker runs it.
                self.queues.push(task, front=True)
            elif task.retries_left > 0 and not task.streamed:
                task.retries_left -= 1
                self.counters["retried"] += 1
                self.queues.push(task, front=True)
            else:
                self._forget(task)
                self.counters["failed"] += task.header.items - task.reported
                self._send(task.client, P.error_frames(task.task_id, P.E_WORKER_LOST, (
                    f"the worker running this task {why} (pid {worker.environment.get('pid')} on "
                    f"{worker.environment.get('host')}); retry the call, or pass retries=N to "
                    "RunnableK8s to retry automatically"
                )))
        self._dispatch(worker.env_key)

    # ------------------------------------------------------------------ reports

    def info(self) -> dict[str, Any]:
        """What a peer learns at WELCOME. ``workers`` (those taking tasks now) is how a client
        first sizes the sub-batches of a batch; it refreshes it from STATUS later."""
        return {
            "protocol": P.PROTOCOL_VERSION,
            "max_message_bytes": self.max_message_bytes,
            "heartbeat_interval": P.HEARTBEAT_INTERVAL,
            "workers": sum(1 for w in self.workers.values() if not w.draining),
        }

    def status(self, now: float) -> dict[str, Any]:
        """The numbers ``runnable-k8s status`` prints (and the autoscaler and metrics read)."""
        workers = [
            {
                "id": w.identity.hex()[-8:],
                "pid": w.environment.get("pid"),
                "host": w.environment.get("host"),
                "slots": w.slots,
                "busy": w.busy,
                "draining": w.draining,
                "cached_runnables": len(w.runnables),
            }
            for w in self.workers.values()
        ]
        return {
            "endpoint": self.endpoint,
            "uptime_s": round(now - self.started_at, 1),
            "workers": workers,
            "slots": sum(w.slots for w in self.workers.values() if not w.draining),
            "busy": sum(w.busy for w in self.workers.values()),
            # Calls, like "busy": a waiting sub-batch counts its items (the autoscaler's demand).
            "queued": self.queues.items,
            "queued_tasks": len(self.queues),
            "held_bytes": self.held_bytes,
            "runnable_store_bytes": self.runnables.size,
            "clients": len(self.clients),
            "runnables_stored": len(self.runnables),
            "counters": dict(self.counters),
            "outbox": dict(self.io_status),
        }

    _rules: ClassVar[dict[type, Callable[[BrokerCore, Any], None]]] = {
        E.Hello: _on_hello,
        E.Submit: _on_submit,
        E.Cancel: _on_cancel,
        E.StatusRequest: _on_status,
        E.Heartbeat: _on_heartbeat,
        E.Bye: _on_bye,
        E.Ready: _on_ready,
        E.Chunk: _on_chunk,
        E.CallbackEvent: _on_callback_event,
        E.Result: _on_result,
        E.WorkerError: _on_error,
        E.Draining: _on_draining,
        E.Tick: _on_tick,
        E.SendFailed: _on_send_failed,
        E.PeerStalled: _on_peer_stalled,
        E.KeysChanged: _on_keys_changed,
        E.Malformed: _on_malformed,
        E.ForeignProtocol: _on_foreign_protocol,
    }
