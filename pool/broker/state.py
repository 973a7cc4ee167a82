"""What the broker remembers between messages: plain records and two stores, no rules and no I/O.

The rules that change this state live in ``core``; keeping the records apart lets tests build
them directly and keeps each file small enough to read whole.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from worker import protocol as P

# What a worker must share with a client to run its objects (protocol, Python, langchain-core,
# cloudpickle): tasks queue by it, so a worker looks only at tasks it can run.
EnvKey = tuple[Any, ...]


def env_key(environment: dict[str, Any]) -> EnvKey:
    return tuple(environment.get(key) for key in P.COMPATIBILITY_KEYS)


def fingerprint(key: bytes | None) -> str:
    """A short, stable name for a key in logs and STATUS (8 hex digits of its SHA-256): enough to
    tell peers apart and match them with ``runnable-k8s keys`` output, and nothing to reuse."""
    return hashlib.sha256(key).hexdigest()[:8] if key is not None else ""


@dataclass(slots=True)
class WorkerState:
    identity: bytes  # the ROUTER routing id replies go to: an address, never a name (peers choose it)
    environment: dict[str, Any]
    env_key: EnvKey
    slots: int
    expiry: float
    # Task id -> the slots it occupies: 1, or for a batch task of k items min(k, slots), so that
    # ``busy`` (what scheduling, status and the autoscaler read) counts calls, not tasks.
    running: dict[bytes, int] = field(default_factory=dict)
    busy: int = 0
    fd: int = -1  # the connection it registered on: messages from any other are not its own
    serial: int = 0  # the broker's own name for it ("w<serial>" in STATUS and logs)
    since: int = 0  # messages the broker had handled when it registered (see events.ConnectionClosed)
    # Input bytes of the tasks sent to it and not finished, and the most it may hold: a worker
    # gets a task only if it fits, or if it holds nothing (one larger task still runs). 256 slots
    # of large inputs would otherwise run a worker Pod out of memory.
    input_budget: int = 1
    input_bytes: int = 0
    inputs: dict[bytes, int] = field(default_factory=dict)
    runnables: OrderedDict[str, None] = field(default_factory=OrderedDict)  # digests it holds
    cache_size: int = 64
    draining: bool = False
    unreachable: bool = False  # a send to it failed: its connection is gone
    last_assigned: float = 0.0
    key: bytes | None = None  # the CurveZMQ public key it registered with (Z85), when keys are on
    # Tasks of the threads it holds that wait for a slot of its own (``pinned.Pinned``): while any
    # wait, it is out of the free-worker index, so its next free slot is theirs.
    waiting: deque[Task] | None = None
    waiting_live: int = 0

    @property
    def shared_threads(self) -> bool:
        """Its READY says its threads' checkpoints live in a store every worker reaches: when it
        leaves, nothing of its threads is lost (``affinity``)."""
        return self.environment.get("checkpointer") == "shared"

    def remember(self, digest: str) -> None:
        """Mirror the worker's own LRU cache, so the broker knows when it may send b"" instead of
        the runnable (a wrong guess costs one E_NEED_RUNNABLE round trip, never a failure)."""
        self.runnables[digest] = None
        self.runnables.move_to_end(digest)
        while len(self.runnables) > self.cache_size:
            self.runnables.popitem(last=False)

    @property
    def label(self) -> str:
        """How logs name it: the broker's serial, pid and host (never the routing id)."""
        return f"w{self.serial} (pid {self.environment.get('pid')} on {self.environment.get('host')})"

    def occupy(self, task_id: bytes, items: int, size: int = 0) -> None:
        """Count a task as running here: a batch of ``items`` takes that many slots, at most all
        of them (it needs one free slot to be sent, and may fill the worker up), and its
        ``size`` input bytes count against the worker's input budget."""
        weight = min(items, self.slots)
        self.busy += weight - self.running.get(task_id, 0)
        self.running[task_id] = weight
        self.input_bytes += size - self.inputs.get(task_id, 0)
        self.inputs[task_id] = size

    def vacate(self, task_id: bytes) -> None:
        self.busy -= self.running.pop(task_id, 0)
        self.input_bytes -= self.inputs.pop(task_id, 0)

    def fits(self, size: int) -> bool:
        """Whether a task of ``size`` input bytes may be sent to it now."""
        return not self.input_bytes or self.input_bytes + size <= self.input_budget

    @property
    def takes_tasks(self) -> bool:
        return not self.draining and self.busy < self.slots and self.input_bytes < self.input_budget


@dataclass(slots=True)
class ClientState:
    identity: bytes  # the ROUTER routing id replies go to
    environment: dict[str, Any]
    env_key: EnvKey
    expiry: float
    tasks: set[bytes] = field(default_factory=set)  # so a client that leaves is cleaned up without a scan
    key: bytes | None = None  # the CurveZMQ public key it connected with (Z85), when keys are on
    held_bytes: int = 0  # input bytes of its tasks the broker holds (queued or running)
    fd: int = -1  # the connection it said HELLO on: messages from any other are not its own
    serial: int = 0  # the broker's own name for it ("c<serial>" in logs)
    since: int = 0  # messages the broker had handled when it registered (see events.ConnectionClosed)
    tenant: Tenant | None = None  # its key's shared budgets (its own connection's, without keys)

    @property
    def label(self) -> str:
        return f"client c{self.serial}" + (f" (key {fingerprint(self.key)})" if self.key is not None else "")


@dataclass(slots=True)
class Tenant:
    """What all connections of one client key share: the budgets (``client_queue_size`` waiting
    tasks, ``client_queue_bytes`` held input) and the connection cap. Per key, not per connection,
    or a key with N connections would get N budgets. Without keys each connection is a tenant
    (the ipc:// socket's folder is the identity, and every connection in it is trusted alike)."""

    name: bytes  # the key, or the routing id of its one connection without keys
    connections: set[bytes] = field(default_factory=set)  # routing ids of its registered clients
    held_bytes: int = 0


@dataclass(eq=False, slots=True)
class Task:
    task_id: bytes
    client: bytes  # routing id of the client connection that sent it (its replies go there)
    header: P.TaskHeader
    header_bytes: bytes
    input_blob: bytes
    env_key: EnvKey
    queued_at: float
    queue_deadline: float
    worker: bytes | None = None
    retries_left: int = 0
    streamed: bool = False
    reported: int = 0  # items of a batch task counted so far (BrokerCore._count_item)
    cancelled: bool = False
    queued: bool = False  # waiting in Queues; False marks a stale queue entry to skip
    size: int = 0  # bytes it holds in the broker (header + input), counted against the budgets
    owner: bytes = b""  # its client's tenant (Tenant.name): queues take turns by tenant
    pinned_to: bytes | None = None  # the worker whose own queue it waits in (its thread's holder), if any
    hedged: bool = False  # a hedge of it was sent (one per task: ``hedges``)


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


# A deque or heap whose stale entries outnumber the live ones by this much is rebuilt: memory
# stays within a small multiple of what is queued, at an amortized O(1) per entry.
_COMPACT_SLACK = 1024


class Queues:
    """Waiting tasks: per environment key, one deque per client, served in turn; plus deadlines.

    Why per environment: a worker can take only tasks of its own environment, and scanning past
    the others on every free slot made dispatch cost grow with the queue. Why per client, in turn:
    with one deque, a client that queued 10,000 tasks made every other client wait behind all of
    them; now each free slot goes to the next client in the rotation, so a flood from one client
    delays that client. Tasks leaving out of order (cancelled, expired) are only marked
    (``task.queued = False``) and dropped when they reach the front, so no leave is O(queue).
    Deadlines sit in a heap because calls with different timeouts do not expire in queue order.
    """

    def __init__(self) -> None:
        # environment -> tenant -> its waiting tasks; the dict's order is the rotation
        self._by_env: dict[EnvKey, OrderedDict[bytes, deque[Task]]] = {}
        self._by_client: Counter[bytes] = Counter()  # live entries per tenant
        self._live_by_env: Counter[EnvKey] = Counter()
        self._deadlines: list[tuple[float, int, Task]] = []
        self._pushes = 0  # heap tie-break: Tasks do not compare
        self._live = 0
        self.items = 0  # calls waiting: a sub-batch task counts its items (the autoscaler's demand)

    def __len__(self) -> int:
        """Tasks waiting, those waiting for one worker (``pinned``) included."""
        return self._live

    def of_client(self, owner: bytes) -> int:
        """Tasks this tenant (a client key, or one connection without keys) has waiting, in all
        environments."""
        return self._by_client.get(owner, 0)

    def live_in(self, key: EnvKey) -> int:
        """Tasks waiting in one environment (a new task of it may skip the queue only at 0)."""
        return self._live_by_env.get(key, 0)

    def push(self, task: Task, *, front: bool = False) -> None:
        """Queue a task; ``front`` for one that was already waiting or running (requeue, retry):
        it goes first in its client's queue, and its client first in the rotation."""
        clients = self._by_env.get(task.env_key)
        if clients is None:
            clients = self._by_env[task.env_key] = OrderedDict()
        tasks = clients.get(task.owner)
        if tasks is None:
            tasks = clients[task.owner] = deque()
        if front:
            tasks.appendleft(task)
            clients.move_to_end(task.owner, last=False)
        else:
            tasks.append(task)
        task.queued = True
        self._live += 1
        self._live_by_env[task.env_key] += 1
        self.items += task.header.items
        self._by_client[task.owner] += 1
        self._pushes += 1
        heapq.heappush(self._deadlines, (task.queue_deadline, self._pushes, task))
        if len(self._deadlines) > 2 * self._live + _COMPACT_SLACK:
            self._deadlines = [entry for entry in self._deadlines if entry[2].queued]
            heapq.heapify(self._deadlines)

    def pop(self, key: EnvKey) -> Task | None:
        """The oldest waiting task of the next client in turn, in this environment, or None."""
        clients = self._by_env.get(key)
        while clients:
            client, tasks = next(iter(clients.items()))
            while tasks:
                task = tasks.popleft()
                if task.queued:
                    task.queued = False
                    self._taken(task)
                    if tasks:
                        clients.move_to_end(client)  # its next task waits for the others' turn
                    else:
                        del clients[client]
                    return task
            del clients[client]
        if clients is not None:  # emptied: an environment nobody uses any more costs nothing
            del self._by_env[key]
        return None

    def count_outside(self, owner: bytes, delta: int) -> None:
        """A task that waits outside these queues (for one worker: ``pinned``) counts against its
        tenant's and the broker's allowances all the same (``of_client``, ``len``): else tasks
        of threads would be a way past ``client_queue_size`` and ``queue_size``."""
        self._live += delta
        left = self._by_client[owner] + delta
        if left:
            self._by_client[owner] = left
        else:
            del self._by_client[owner]

    def _taken(self, task: Task) -> None:
        client = task.owner
        self._live -= 1
        env_left = self._live_by_env[task.env_key] - 1
        if env_left:
            self._live_by_env[task.env_key] = env_left
        else:
            del self._live_by_env[task.env_key]
        self.items -= task.header.items
        left = self._by_client[client] - 1
        if left:
            self._by_client[client] = left
        else:
            del self._by_client[client]

    def discard(self, task: Task) -> None:
        """Take a task out wherever it is (its entry is skipped later)."""
        if not task.queued:
            return
        task.queued = False
        self._taken(task)
        clients = self._by_env[task.env_key]
        tasks = clients.get(task.owner)
        if tasks is not None and len(tasks) > 2 * self.of_client(task.owner) + _COMPACT_SLACK:
            live = deque(t for t in tasks if t.queued)
            if live:
                clients[task.owner] = live
            else:
                del clients[task.owner]

    def expired(self, now: float) -> list[Task]:
        """Take out and return every waiting task whose queue deadline is before ``now``."""
        out = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now:
            task = heapq.heappop(deadlines)[2]
            if task.queued:
                self.discard(task)
                out.append(task)
        return out

    def waiting(self, key: EnvKey) -> int:
        """Entries of one environment, stale ones included (for tests of the structure)."""
        return sum(len(tasks) for tasks in self._by_env.get(key, {}).values())
