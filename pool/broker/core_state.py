"""The broker core's state and the few helpers every rule family uses (send, warn, cut).

``BrokerCore`` (``core``) is this state plus the rule families, each a class in its own module
that adds the rules of one concern: ``slots`` (tasks onto workers' slots), ``departures`` (a peer
leaving), ``admission`` (who may send what), ``budgets``, ``reports``, ``client_rules``,
``worker_rules``, ``reply_rules`` and ``liveness``. Every family works on this one state; none
holds any of its own.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from pool.broker.affinity import MAX_THREADS, Threads
from pool.broker.events import Disconnect, Effect, FromPeer, Send
from pool.broker.histogram import Histogram
from pool.broker.log_limit import PeerLog
from pool.broker.pinned import Pinned
from pool.broker.state import (
    ClientState,
    EnvKey,
    Queues,
    RunnableStore,
    Task,
    Tenant,
    WorkerState,
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
            "connections_cut", "connections_closed",
            # a rule raised: a bug in the broker, not a bad peer (logged with its traceback)
            "rule_errors",
            # REPLIES messages received from workers, and the entries (tokens, events, results) in
            # them: entries_relayed / replies_packed is how many replies travel per message
            "replies_packed", "entries_relayed",
            # tasks of a thread sent (or queued) to the worker that holds it, and tasks answered
            # E_THREAD_LOST because that worker is gone with the thread's checkpoint
            "threads_pinned", "threads_lost",
            # duplicates of a running task started on another worker, and those answered E_NO_HEDGE
            "hedges_sent", "hedges_refused")

# The error codes a client surfaces as an exception (worker.protocol; pool.errors maps each to its
# class), as the label value of runnable_k8s_task_errors_total; any other code an ERROR carries
# (a worker of another version) counts as "other", so the label's values stay this bounded set.
# The internal codes (need-runnable, requeue, hello-required, cancelled, busy, no-hedge) are steps
# of the protocol, not failures: they are not counted (busy has runnable_k8s_busy_total).
ERROR_CODES = (P.E_REMOTE, P.E_WORKER_LOST, P.E_TIMEOUT, P.E_QUEUE_TIMEOUT, P.E_QUEUE_FULL, P.E_INCOMPATIBLE,
               P.E_PAYLOAD_TOO_LARGE, P.E_SERIALIZATION, P.E_BAD_REQUEST, P.E_UNAUTHORIZED, P.E_THREAD_LOST)
OTHER_ERROR = b"other"
_ERROR = P.ERROR
_NOT_COUNTED = frozenset((P.E_NEED_RUNNABLE, P.E_REQUEUE, P.E_HELLO_REQUIRED, P.E_CANCELLED, P.E_BUSY,
                          P.E_NO_HEDGE))


class CoreState:
    """The broker's state and its settings. Not thread-safe: one loop owns it."""

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
        strict: bool = False,
        max_threads: int = MAX_THREADS,
    ) -> None:
        """``client_keys`` / ``worker_keys``: the Z85 public keys allowed to act as clients /
        workers (None: any peer, for a broker without CurveZMQ); the folders only name them in
        refusals. ``max_worker_slots``: the most slots a worker gets, whatever its READY claims.
        ``queue_size``/``queue_bytes`` bound what all clients' tasks hold in the broker,
        ``client_queue_size``/``client_queue_bytes`` what one client key's do (all its
        connections together), ``max_connections_per_key`` how many connections it may have.
        ``worker_input_budget``: input bytes in flight to a worker that did not report its memory.
        ``strict``: a rule that raises raises out of ``handle`` (tests), instead of being logged
        and counted as ``rule_errors`` while the pool keeps serving (production). ``max_threads``:
        the most threads (task affinities) the broker follows, and the most lost ones it remembers."""
        if max_worker_slots < 1:
            raise ValueError("max_worker_slots must be 1 or more")
        if min(queue_size, queue_bytes, client_queue_size, client_queue_bytes, max_connections_per_key,
               worker_input_budget) < 1:
            raise ValueError("queue sizes, byte budgets and connection caps must be 1 or more")
        self.endpoint = endpoint
        self.strict = strict
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
        self.messages = 0  # messages from peers handled so far (events.ConnectionClosed.seen)
        self._serials: Counter[str] = Counter()  # the broker's own names for peers: c1, c2, ...; w1, w2, ...
        self.tasks: dict[bytes, Task] = {}
        self.queues = Queues()
        self.threads = Threads(max_threads)  # which worker holds which thread (affinity)
        self.pinned = Pinned(self.queues)  # tasks waiting for their thread's worker
        self.runnables = RunnableStore(runnable_store_bytes)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # ERRORs the broker sent, by code (ERROR_CODES or OTHER_ERROR): the broker's own refusals
        # and timeouts and the workers' errors it relays.
        self.errors_by_code: dict[bytes, int] = dict.fromkeys((*ERROR_CODES, OTHER_ERROR), 0)
        # Seconds from SUBMIT to the task's dispatch to a worker, observed at dispatch (``_run_on``).
        self.queue_wait = Histogram()
        # Workers that take tasks now (not draining, a slot free), by environment: dispatch looks
        # only here. Insertion order is assignment order, so exact ties go to the least recent.
        self._free: dict[EnvKey, dict[bytes, WorkerState]] = {}
        self._workers_by_env: Counter[EnvKey] = Counter()
        self._out: list[Effect] = []
        self.peer_log = PeerLog(log)
        # A rule that fails on every message logs a few tracebacks per rule and minute, not one each.
        self.rule_log = PeerLog(log, burst=3, total=20, level=logging.ERROR, what="internal errors of {} rule(s)")

    @property
    def queued(self) -> int:
        return len(self.queues)

    def _warn(self, event: FromPeer, message: str, *args: Any, exc_info: bool = False) -> None:
        """A warning about bad input, a few per peer (key, or connection) per interval."""
        if event.key is not None:
            who: object = event.key
            label = f"key {fingerprint(event.key)}"
        else:
            who = event.fd if event.fd >= 0 else event.peer
            label = f"connection fd {event.fd}" if event.fd >= 0 else "a peer"
        self.peer_log.warning(who, label, self.now, message, *args, exc_info=exc_info)

    def _disconnect(self, fd: int) -> None:
        if fd >= 0:
            self.counters["connections_cut"] += 1
            self.connections.pop(fd, None)
            self._out.append(Disconnect(fd))

    def _next_serial(self, role: str) -> int:
        self._serials[role] += 1
        return self._serials[role]

    def _send(self, peer: bytes, frames: list[bytes]) -> None:
        if len(frames) > 3 and frames[1] == _ERROR:  # a comparison per message sent
            self._count_error(frames[3])
        self._out.append(Send(peer, frames))

    def _count_error(self, code: bytes) -> None:
        """Count an ERROR sent, under its code if a client surfaces it, else under "other"."""
        if code in self.errors_by_code:
            self.errors_by_code[code] += 1
        elif code not in _NOT_COUNTED:
            self.errors_by_code[OTHER_ERROR] += 1

    def _expiry(self) -> float:
        return self.now + P.HEARTBEAT_EXPIRY
