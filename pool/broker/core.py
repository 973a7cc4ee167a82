"""Every rule of the broker, without sockets or clocks: events in, messages out.

``BrokerCore.handle(event, now)`` applies one event (``events``) to the state (``state``) and
returns the effects to carry out, mostly ``Send(peer, frames)``. The time is an argument, so a
test can expire a worker or a queued task by passing a later ``now``, in microseconds, with no
process, socket or sleep (tests/test_broker_core.py); the socket loop (``server``) is then only a
translator. The model is h11 and dask's worker state machine; the rules are DESIGN §4 and §5.

Who a peer is. The ROUTER's routing id is only an address: libzmq picks one per connection, but a
peer can choose its own and take over the id of one that left. So every event carries the
connection it came from (its fd) and the CurveZMQ key that connection authenticated with, and
before any rule runs (``_admit``): a state registered under that routing id by another
connection or key is dropped as a lost peer (libzmq never has two live connections under one id,
so that connection is gone), the key must still be allowed, and the command must be one of the
key's role. Budgets belong to a client key across all its connections (``state.Tenant``).

Cost: a task is queued by its environment key and handed out oldest first from that queue only;
one dispatch compares the free workers of that environment, never the queue. Tasks that leave
the queue early are marked and skipped (see ``state.Queues``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

from pool.broker import events as E
from pool.broker.log_limit import PeerLog
from pool.broker.scheduling import Candidate, choose_worker
from pool.broker.state import (
    ClientState,
    EnvKey,
    Queues,
    RunnableStore,
    Task,
    Tenant,
    WorkerState,
    env_key,
    fingerprint,
)
from worker import defaults
from worker import protocol as P

log = logging.getLogger("runnable_k8s.broker")

COUNTERS = ("submitted", "done", "failed", "cancelled", "retried", "workers_lost", "malformed", "refused",
            "runnable_bytes_received", "slots_clamped", "clients_dropped", "peers_revoked",
            # tasks answered E_BUSY (their key's or the broker's allowance was full for now)
            "busy",
            # states dropped because another connection or key used their routing id
            "peers_replaced",
            # messages not acted on because of who sent them: a command of the other role, a
            # key no longer allowed, a reply for a task not sent to that connection, a CANCEL of
            # another client's task
            "messages_refused",
            # connections closed by the broker (revoked keys) and by their peer (the monitor)
            "connections_cut", "connections_closed")
# Commands by role: with keys, a client key may send only the first, a worker key only the second
# (STATUS, HEARTBEAT and BYE are either's: a client asks for STATUS, a draining worker fences with it).
_CLIENT_COMMANDS: frozenset[type] = frozenset({E.Hello, E.Submit, E.Cancel})
_WORKER_COMMANDS: frozenset[type] = frozenset({E.Ready, E.Chunk, E.CallbackEvent, E.Result, E.WorkerError,
                                               E.Draining})
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
        max_connections_per_key: int = defaults.MAX_CONNECTIONS_PER_KEY,
        worker_input_budget: int = defaults.WORKER_INPUT_BUDGET,
    ) -> None:
        """``client_keys`` / ``worker_keys``: the Z85 public keys allowed to act as clients /
        workers (None: any peer, for a broker without CurveZMQ); the folders only name them in
        refusals. ``max_worker_slots``: the most slots a worker gets, whatever its READY claims.
        ``queue_size``/``queue_bytes`` bound what all clients' tasks hold in the broker,
        ``client_queue_size``/``client_queue_bytes`` what one client key's do (all its
        connections together), ``max_connections_per_key`` how many connections it may have.
        ``worker_input_budget``: input bytes in flight to a worker that did not report its memory."""
        if max_worker_slots < 1:
            raise ValueError("max_worker_slots must be 1 or more")
        if min(queue_size, queue_bytes, client_queue_size, client_queue_bytes, max_connections_per_key,
               worker_input_budget) < 1:
            raise ValueError("queue sizes, byte budgets and connection caps must be 1 or more")
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
        self.max_connections_per_key = max_connections_per_key
        self.worker_input_budget = worker_input_budget
        self.held_bytes = 0  # input bytes of all tasks held (queued or running)
        # Numbers of the socket side (the outbox), refreshed by the loop every tick, so that a
        # STATUS answer shows them without the core reaching into I/O.
        self.io_status: dict[str, Any] = {}
        self.max_worker_slots = max_worker_slots
        self.started_at = now
        self.now = now
        self.workers: dict[bytes, WorkerState] = {}
        self.clients: dict[bytes, ClientState] = {}
        self.tenants: dict[bytes, Tenant] = {}  # by client key (by routing id without keys)
        # Every connection seen with a key (fd -> key), registered or not: a revoked key's
        # connections are cut even if they only ever asked for STATUS.
        self.connections: dict[int, bytes] = {}
        self._peer_of_fd: dict[int, bytes] = {}  # fd -> routing id of what registered on it
        self.messages = 0  # messages from peers handled so far (E.ConnectionClosed.seen)
        self._serials: Counter[str] = Counter()  # the broker's own names for peers: c1, c2, ...; w1, w2, ...
        self.tasks: dict[bytes, Task] = {}
        self.queues = Queues()
        self.runnables = RunnableStore(runnable_store_bytes)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # Workers that take tasks now (not draining, a slot free), by environment: dispatch looks
        # only here. Insertion order is assignment order, so exact ties go to the least recent.
        self._free: dict[EnvKey, dict[bytes, WorkerState]] = {}
        self._workers_by_env: Counter[EnvKey] = Counter()
        self._out: list[E.Effect] = []
        self.peer_log = PeerLog(log)

    @property
    def queued(self) -> int:
        return len(self.queues)

    def handle(self, event: E.Event, now: float) -> list[E.Effect]:
        """Apply one event at time ``now`` (monotonic seconds); return what to send, in order."""
        self.now = now
        out: list[E.Effect] = []
        self._out = out
        try:
            if not isinstance(event, E.FromPeer) or self._admit(event):
                self._rules[event.__class__](self, event)
        except Exception:  # one bad message must not stop the pool
            self.counters["malformed"] += 1
            if isinstance(event, E.FromPeer):
                self._warn(event, "dropped a %s that could not be handled", type(event).__name__, exc_info=True)
            else:
                log.warning("could not handle %s", type(event).__name__, exc_info=True)
        return out

    # ------------------------------------------------------------------ who sent it

    def _admit(self, event: E.FromPeer) -> bool:
        """Whether the rules may act on this message, by who sent it (see the module's docstring).
        Runs before every rule: a few dict look-ups."""
        peer, fd, key = event.peer, event.fd, event.key
        self.messages += 1
        if fd >= 0:  # (-1: a message the loop could not place, e.g. with no frames; it acts on nothing)
            if key is not None:
                self.connections[fd] = key
            client = self.clients.get(peer)
            if client is not None and (client.fd != fd or client.key != key):
                self._replaced(client, None)
            worker = self.workers.get(peer)
            if worker is not None and (worker.fd != fd or worker.key != key):
                self._replaced(None, worker)
        kind = event.__class__
        if kind is E.Malformed or kind is E.ForeignProtocol:
            return True
        clients_ok = self.client_keys is None or key in self.client_keys
        workers_ok = self.worker_keys is None or key in self.worker_keys
        if not clients_ok and not workers_ok:  # revoked while connected, or never allowed
            self.counters["messages_refused"] += 1
            self._warn(event, "refused a %s: its key is in no allow-list (revoked?)", kind.__name__)
            if kind is E.Hello or kind is E.Ready:
                self._refuse_registration(event)
            self._disconnect(fd)
            return False
        if (kind in _CLIENT_COMMANDS and not clients_ok) or (kind in _WORKER_COMMANDS and not workers_ok):
            if kind is E.Hello or kind is E.Ready:
                self._refuse_registration(event)
            else:
                self.counters["messages_refused"] += 1
                role = "client" if kind in _CLIENT_COMMANDS else "worker"
                self._warn(event, "refused a %s: it is a %s command and this key is not a %s key", kind.__name__,
                           role, role)
            return False
        return True

    def _replaced(self, client: ClientState | None, worker: WorkerState | None) -> None:
        """Another connection (or key) sent a message under this state's routing id, so the
        connection that registered it is gone: drop it as a lost peer. No handover: whoever
        sends now registers anew, and gets nothing of the old state (tasks, replies, budget)."""
        if client is None and worker is None:
            return
        self.counters["peers_replaced"] += 1
        if client is not None:
            log.info("%s: its connection is gone (another one uses its routing id); its %d tasks are cancelled",
                     client.label, len(client.tasks))
            self._remove_client(client.identity)
            self._out.append(E.Forget(client.identity))
        if worker is not None:
            self._remove_worker(worker.identity, "lost its connection")
            self._out.append(E.Forget(worker.identity))

    def _refuse_registration(self, event: E.FromPeer) -> None:
        """A HELLO or READY from a key not allowed in that role: say so (its peer needs to know)."""
        self.counters["refused"] += 1
        if event.__class__ is E.Hello:
            self._warn(event, "refused a client whose key is not in the client allow-list %s", self.client_keys_dir)
            self._send(event.peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this key may not connect as a client: the broker accepts clients only with the public keys in "
                "its clients/ allow-list (add one with `runnable-k8s keys DIR --client NAME`)"
            )))
        else:
            self._warn(event, "refused a worker whose key is not one of the %d keys in the worker allow-list %s",
                       len(self.worker_keys or ()), self.worker_keys_dir)
            self._send(event.peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this key may not register as a worker: the broker accepts workers only with the public "
                "keys in its workers/ allow-list (the worker folder of `runnable-k8s keys DIR`)"
            )))

    def _disconnect(self, fd: int) -> None:
        if fd >= 0:
            self.counters["connections_cut"] += 1
            self.connections.pop(fd, None)
            self._out.append(E.Disconnect(fd))

    def _warn(self, event: E.FromPeer, message: str, *args: Any, exc_info: bool = False) -> None:
        """A warning about bad input, a few per peer (key, or connection) per interval."""
        if event.key is not None:
            who: object = event.key
            label = f"key {fingerprint(event.key)}"
        else:
            who = event.fd if event.fd >= 0 else event.peer
            label = f"connection fd {event.fd}" if event.fd >= 0 else "a peer"
        self.peer_log.warning(who, label, self.now, message, *args, exc_info=exc_info)

    def _bind_fd(self, fd: int, peer: bytes) -> None:
        """Note that ``peer`` registered on connection ``fd``. A state another routing id holds on
        the same fd is gone: the number was reused, so its connection closed."""
        if fd < 0:
            return
        old = self._peer_of_fd.get(fd)
        if old is not None and old != peer:
            client, worker = self.clients.get(old), self.workers.get(old)
            self._replaced(client if client is not None and client.fd == fd else None,
                           worker if worker is not None and worker.fd == fd else None)
        self._peer_of_fd[fd] = peer

    def _next_serial(self, role: str) -> int:
        self._serials[role] += 1
        return self._serials[role]

    def _send(self, peer: bytes, frames: list[bytes]) -> None:
        self._out.append(E.Send(peer, frames))

    def _expiry(self) -> float:
        return self.now + P.HEARTBEAT_EXPIRY

    # ------------------------------------------------------------------ malformed input

    def _on_malformed(self, event: E.Malformed) -> None:
        self.counters["malformed"] += 1
        self._warn(event, "dropped %s", event.reason)

    def _on_foreign_protocol(self, event: E.ForeignProtocol) -> None:
        """Answered in the peer's own protocol frame, so that an older client can read it."""
        self.counters["malformed"] += 1
        theirs = event.protocol.decode(errors="replace")
        try:
            newer = int(theirs.rpartition("/")[2]) > P.PROTOCOL_VERSION
        except ValueError:
            newer = False
        if newer:
            advice = ("this peer is newer than the pool: upgrade the pool first (helm upgrade the chart, or "
                      "restart the broker and workers with the new runnable-k8s release)")
        else:
            advice = ("upgrade the pool first if it is not yet on the new release (helm upgrade the chart, or "
                      "restart the broker and workers with it), then the clients (pip install -U runnable-k8s) "
                      "and any worker image built from an older release")
        message = f"this broker speaks {P.PROTOCOL.decode()} but this peer speaks {theirs}; {advice}"
        self._send(event.peer, [event.protocol, P.ERROR, b"", P.E_INCOMPATIBLE, message.encode(), b""])

    # ------------------------------------------------------------------ clients

    def _on_hello(self, event: E.Hello) -> None:
        peer, environment, key = event.peer, event.environment, event.key
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(peer, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"client protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}; "
                "use the same runnable-k8s release on the client and the pool"
            )))
            return
        known = self.clients.get(peer)  # the same connection (``_admit`` dropped any other's)
        tenant = self.tenants.get(key if key is not None else peer)
        if (known is None and key is not None and tenant is not None
                and len(tenant.connections) >= self.max_connections_per_key):
            self.counters["refused"] += 1
            self._warn(event, "refused a client connection: its key already has %d", len(tenant.connections))
            self._send(peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                f"this client key already has {len(tenant.connections)} connections open to the broker, its "
                f"limit (--max-connections-per-key {self.max_connections_per_key}); close some (one RunnableK8s "
                "per process is enough: it is safe to share between threads) or start the broker with a "
                "higher --max-connections-per-key"
            )))
            return
        if tenant is None:
            tenant = self.tenants[key if key is not None else peer] = Tenant(key if key is not None else peer)
        tenant.connections.add(peer)
        if known is not None:
            known.environment, known.env_key, known.expiry = environment, env_key(environment), self._expiry()
        else:
            self.clients[peer] = ClientState(peer, environment, env_key(environment), self._expiry(), key=key,
                                             fd=event.fd, serial=self._next_serial("client"), tenant=tenant,
                                             since=self.messages)
            self._bind_fd(event.fd, peer)
        self._send(peer, [P.PROTOCOL, P.WELCOME, P.encode_json(self.info())])

    def _on_submit(self, event: E.Submit) -> None:
        client, task_id, runnable = event.peer, event.task_id, event.runnable
        self.counters["runnable_bytes_received"] += len(runnable)
        state = self.clients.get(client)
        if state is None or state.tenant is None:
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
        held = len(event.header) + len(event.input_blob)
        full = self._over_budget(state.tenant, held)
        if full is not None:
            code, why = full
            if code == P.E_BUSY:  # backpressure: the client sends it again when one of its tasks ends
                self.counters["busy"] += 1
                log.debug("task %s not taken now: %s", task_id.hex()[:8], why)
                self._send(client, P.error_frames(task_id, P.E_BUSY, why))
            else:
                self._refuse(client, task_id, code, why)
            return
        problem = self._incompatible_with_all(state)
        if problem:
            self._refuse(client, task_id, P.E_INCOMPATIBLE, problem)
            return
        now = self.now
        queue_timeout = self.queue_timeout if header.timeout is None else min(self.queue_timeout, header.timeout)
        task = Task(task_id, client, header, event.header, event.input_blob, state.env_key, now, now + queue_timeout,
                    retries_left=header.retries, size=held, owner=state.tenant.name)
        self.tasks[task_id] = task
        state.tasks.add(task_id)
        state.held_bytes += held
        state.tenant.held_bytes += held
        self.held_bytes += held
        self.counters["submitted"] += header.items
        free = self._free.get(task.env_key)
        # A free worker and nothing of this environment waiting: skip the queue. (Something may
        # wait while a worker is free: a task that fits no worker's input budget now; a new task
        # waits behind it rather than starve it.)
        if not (free and not self.queues.live_in(task.env_key) and self._assign(task, free)):
            self.queues.push(task)
        if not self.workers:
            self._out.append(E.WakeObservers())

    def _over_budget(self, tenant: Tenant, size: int) -> tuple[bytes, str] | None:
        """Whether one more task of ``size`` bytes fits now: None, ``E_BUSY`` when it fits the
        allowances on its own but not beside what is held now (the client waits for one of its
        tasks to end and sends it again), or ``E_QUEUE_FULL`` when it never could. A client's
        own limits come first, so a client at its limit learns it is its own backlog."""
        if size > self.client_queue_bytes:
            return P.E_QUEUE_FULL, (
                f"this task holds {size} bytes of input, more than one client may have held in the broker "
                f"(--client-queue-bytes {self.client_queue_bytes}); send a smaller input, or start the broker "
                "with a larger --client-queue-bytes")
        if size > self.queue_bytes:
            return P.E_QUEUE_FULL, (
                f"this task holds {size} bytes of input, more than the broker holds for all clients "
                f"(--queue-bytes {self.queue_bytes}); send a smaller input, or give the broker a larger "
                "--queue-bytes (or --memory-limit)")
        later = "it is sent again when one of this client's tasks finishes"
        waiting = self.queues.of_client(tenant.name)
        if waiting >= self.client_queue_size:
            return P.E_BUSY, (f"this client already has {waiting} tasks waiting in the broker's queue, its limit "
                              f"(--client-queue-size {self.client_queue_size}); {later}")
        if tenant.held_bytes + size > self.client_queue_bytes:
            return P.E_BUSY, (f"this client's tasks already hold {tenant.held_bytes} bytes of input in the broker; "
                              f"one more of {size} bytes would pass its limit (--client-queue-bytes "
                              f"{self.client_queue_bytes}); {later}")
        if len(self.queues) >= self.queue_size:
            return P.E_BUSY, f"the broker's queue is full ({self.queue_size} tasks waiting, --queue-size); {later}"
        if self.held_bytes + size > self.queue_bytes:
            return P.E_BUSY, (f"the broker holds {self.held_bytes} bytes of task input, near its limit "
                              f"(--queue-bytes {self.queue_bytes}); {later}")
        return None

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
        if task is None:
            return  # already finished: nothing to cancel
        if task.client != event.peer:  # not this connection's task (a guessed or stolen id)
            self.counters["messages_refused"] += 1
            self._warn(event, "refused a CANCEL of a task another client submitted")
            return
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
        if self._peer_of_fd.get(state.fd) == identity:
            del self._peer_of_fd[state.fd]
        for task_id in list(state.tasks):
            task = self.tasks.get(task_id)
            if task is not None:
                self._cancel(task)
        tenant = state.tenant
        if tenant is not None:
            tenant.connections.discard(identity)
            self._drop_tenant_if_idle(tenant)

    def _drop_tenant_if_idle(self, tenant: Tenant) -> None:
        if not tenant.connections and tenant.held_bytes <= 0 and self.tenants.get(tenant.name) is tenant:
            del self.tenants[tenant.name]

    # ------------------------------------------------------------------ workers

    def _on_ready(self, event: E.Ready) -> None:
        worker, environment = event.peer, event.environment
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(worker, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"worker protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}; "
                "run the broker and the workers from the same runnable-k8s release"
            )))
            return
        slots = max(1, int(environment.get("concurrency", 1)))  # a ValueError here is a malformed READY
        cache_size = max(1, int(environment.get("cache_size", 64)))
        if worker in self.workers:
            self._remove_worker(worker, "re-registered")
        state = WorkerState(worker, environment, env_key(environment), slots, self._expiry(), cache_size=cache_size,
                            key=event.key, fd=event.fd, serial=self._next_serial("worker"),
                            input_budget=self._input_budget(environment))
        if slots > self.max_worker_slots:  # a worker's word is not trusted beyond the cap
            self.counters["slots_clamped"] += 1
            self._warn(event, "worker %s claimed %d slots; it gets %d (--max-worker-slots)", state.label, slots,
                       self.max_worker_slots)
            state.slots = self.max_worker_slots
        state.since = self.messages
        self.workers[worker] = state
        self._bind_fd(event.fd, worker)
        self._workers_by_env[state.env_key] += 1
        self._refresh(state)
        log.info("worker %s ready with %d slots and an input budget of %d bytes", state.label, state.slots,
                 state.input_budget)
        self._send(worker, [P.PROTOCOL, P.WELCOME, P.encode_json(self.info())])
        self._dispatch(state.env_key)

    def _input_budget(self, environment: dict[str, Any]) -> int:
        """Input bytes this worker may have in flight: a fraction of the memory limit its READY
        reports (``memory_limit``, from its cgroup), or the default when it reports none."""
        limit = environment.get("memory_limit")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return max(1, limit // defaults.WORKER_INPUT_BUDGET_DIVISOR)
        return self.worker_input_budget

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
        """The task, if it was sent to this worker (``_admit`` made sure the message comes from
        the connection that registered it); a reply about any other task is not acted on."""
        task = self.tasks.get(task_id)
        if task is None:
            return None  # a late reply for a task that finished or was cancelled
        if task.worker != worker:  # reassigned since, or never this worker's
            self.counters["messages_refused"] += 1
            return None
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
            self._warn(event, "worker %s reported: %s", state.label, event.body[2:3])
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
            log.info("worker %s is draining (%d tasks left)", state.label, len(state.running))

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
        """Give this environment's queued tasks, in turn by client and oldest first, to its workers
        with free slots. A task that fits no free worker's input budget now stays first in line
        and dispatch stops there: it goes out when a worker's tasks finish (``_release`` calls
        this again), and tasks behind it wait rather than starve it. So one call costs at most
        one look at the free workers per task sent, plus one for the task that waits."""
        free = self._free.get(key)
        while free:
            task = self.queues.pop(key)
            if task is None:
                return
            if not self._assign(task, free):
                self.queues.push(task, front=True)
                return
            free = self._free.get(key)

    def _assign(self, task: Task, free: dict[bytes, WorkerState]) -> bool:
        """Send one task to the worker the policy picks among ``free`` (its environment's) whose
        input budget it fits; False (nothing done) when it fits none of them now."""
        digest, size = task.header.digest, task.size
        chosen = choose_worker([
            Candidate(w.identity, w.slots, w.busy, digest in w.runnables, w.last_assigned)
            for w in free.values() if w.fits(size)
        ])
        if chosen is None:
            return False
        worker = free.pop(chosen)  # re-inserted last by _refresh: exact ties go to the least recent
        blob = b"" if digest in worker.runnables else self.runnables.get(digest)
        if blob is None:  # evicted from the store while queued: the client sends it again
            self._refresh(worker)
            self._forget(task)
            self._send(task.client, P.error_frames(task.task_id, P.E_NEED_RUNNABLE, NEED_RUNNABLE_MESSAGE))
            return True
        task.worker = chosen
        worker.occupy(task.task_id, task.header.items, size)
        worker.last_assigned = self.now
        self._refresh(worker)
        self._send_task(worker, task, blob)
        return True

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
        if client is not None and task.task_id in client.tasks:  # not a later connection's, at the same id
            client.tasks.discard(task.task_id)
            client.held_bytes -= task.size
        tenant = self.tenants.get(task.owner)
        if tenant is not None:
            tenant.held_bytes -= task.size
            self._drop_tenant_if_idle(tenant)

    # ------------------------------------------------------------------ liveness

    def _on_tick(self, event: E.Tick) -> None:
        now = self.now
        self.peer_log.tick(now)
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
        log.info("a peer is gone; dropped a %s to it", P.COMMAND_NAMES.get(frames[1], "?"))
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
            log.warning("dropped %s: %d bytes of replies wait for it and it does not read them; its "
                        "%d tasks are cancelled", self.clients[peer].label, event.unread_bytes,
                        len(self.clients[peer].tasks))
            self._remove_client(peer)
        elif peer in self.workers:
            log.warning("worker %s does not read what the broker sends (%d bytes wait)", self.workers[peer].label,
                        event.unread_bytes)
            self._worker_unreachable(self.workers[peer])

    def _on_keys_changed(self, event: E.KeysChanged) -> None:
        """Take effect at once for peers already connected: CurveZMQ checks a key only at the
        handshake, so every connection of a revoked key is cut here (registered or not), and any
        message still on its way from one is refused by ``_admit``."""
        self.client_keys, self.worker_keys = event.client_keys, event.worker_keys
        for client in [c for c in self.clients.values() if c.key is not None and c.key not in event.client_keys]:
            self.counters["peers_revoked"] += 1
            log.warning("%s: its key was taken out of the allow-list; its %d tasks fail and its connection is cut",
                        client.label, len(client.tasks))
            for task_id in list(client.tasks):
                if task_id in self.tasks:
                    self._send(client.identity, P.error_frames(task_id, P.E_UNAUTHORIZED, (
                        "this client's key was taken out of the broker's allow-list while the call ran"
                    )))
            self._remove_client(client.identity)
            self._disconnect(client.fd)
            self._out.append(E.Forget(client.identity))
        for worker in [w for w in self.workers.values() if w.key is not None and w.key not in event.worker_keys]:
            self.counters["peers_revoked"] += 1
            self._send(worker.identity, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this worker's key was taken out of the broker's allow-list"
            )))
            self._remove_worker(worker.identity, "had its key revoked")
            self._disconnect(worker.fd)
            self._out.append(E.Forget(worker.identity))
        allowed = event.client_keys | event.worker_keys
        for fd in [fd for fd, key in self.connections.items() if key not in allowed]:
            self._disconnect(fd)

    def _on_connection_closed(self, event: E.ConnectionClosed) -> None:
        """The peer's connection closed: what registered on it is gone now. A worker's tasks are
        retried or fail as on any lost worker; a client's are cancelled."""
        fd, seen = event.fd, event.seen
        self.counters["connections_closed"] += 1
        self.connections.pop(fd, None)
        peer = self._peer_of_fd.get(fd)
        if peer is None:
            return
        client, worker = self.clients.get(peer), self.workers.get(peer)
        gone = False
        if client is not None and client.fd == fd and (seen is None or client.since <= seen):
            self._remove_client(peer)
            gone = True
        if worker is not None and worker.fd == fd and (seen is None or worker.since <= seen):
            self._remove_worker(peer, "lost its connection")
            gone = True
        if gone:
            self._peer_of_fd.pop(fd, None)
            self._out.append(E.Forget(peer))

    def _worker_unreachable(self, worker: WorkerState) -> None:
        """A send to this worker failed: its connection is gone. What it sent before leaving (its
        last results, its BYE) may still be waiting to be read, so it is not removed at once: it
        gets no more tasks, its BYE removes it, or else the next tick does (its tasks then fail)."""
        if not worker.unreachable:
            log.info("worker %s is unreachable", worker.label)
        worker.unreachable = True
        worker.draining = True
        worker.expiry = min(worker.expiry, self.now)
        self._refresh(worker)

    def _remove_worker(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        if self._peer_of_fd.get(worker.fd) == identity:
            del self._peer_of_fd[worker.fd]
        self._workers_by_env[worker.env_key] -= 1
        if not self._workers_by_env[worker.env_key]:
            del self._workers_by_env[worker.env_key]
        self._refresh(worker)
        said_goodbye = why == "said goodbye"
        if not said_goodbye:
            self.counters["workers_lost"] += 1
        log.log(logging.INFO if said_goodbye else logging.WARNING, "worker %s removed: %s (%d tasks running)",
                worker.label, why, len(worker.running))
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
            # A client's allowances, so it can keep its own window of tasks within them (past
            # them a task is answered "busy" and sent again later): per client key, all its
            # connections together, and for the whole broker.
            "client_queue_size": self.client_queue_size,
            "client_queue_bytes": self.client_queue_bytes,
            "queue_size": self.queue_size,
            "queue_bytes": self.queue_bytes,
            "max_connections_per_key": self.max_connections_per_key,
        }

    def status(self, now: float) -> dict[str, Any]:
        """The numbers ``runnable-k8s status`` prints (and the autoscaler and metrics read)."""
        workers = [
            {
                # The broker's own serial, never the routing id (an address a peer can choose,
                # and use to pose as this worker); "key" tells apart workers of different keys.
                "id": f"w{w.serial}",
                "key": fingerprint(w.key),
                "pid": w.environment.get("pid"),
                "host": w.environment.get("host"),
                "slots": w.slots,
                "busy": w.busy,
                "draining": w.draining,
                "cached_runnables": len(w.runnables),
                "input_bytes": w.input_bytes,
                "input_budget": w.input_budget,
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
            "client_keys": sum(1 for t in self.tenants.values() if t.connections),
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
        E.ConnectionClosed: _on_connection_closed,
        E.Malformed: _on_malformed,
        E.ForeignProtocol: _on_foreign_protocol,
    }
