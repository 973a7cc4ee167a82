"""What the broker remembers between messages: plain records and two stores, no rules and no I/O.

The rules that change this state live in ``core``; keeping the records apart lets tests build
them directly and keeps each file small enough to read whole.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from worker import protocol as P

# What a worker must share with a client to run its objects (protocol, Python, langchain-core,
# cloudpickle): tasks queue by it, so a worker looks only at tasks it can run.
EnvKey = tuple[Any, ...]


def env_key(environment: dict[str, Any]) -> EnvKey:
    return tuple(environment.get(key) for key in P.COMPATIBILITY_KEYS)


@dataclass(slots=True)
class WorkerState:
    identity: bytes
    environment: dict[str, Any]
    env_key: EnvKey
    slots: int
    expiry: float
    running: set[bytes] = field(default_factory=set)
    runnables: OrderedDict[str, None] = field(default_factory=OrderedDict)  # digests it holds
    cache_size: int = 64
    draining: bool = False
    unreachable: bool = False  # a send to it failed: its connection is gone
    last_assigned: float = 0.0

    def remember(self, digest: str) -> None:
        """Mirror the worker's own LRU cache, so the broker knows when it may send b"" instead of
        the runnable (a wrong guess costs one E_NEED_RUNNABLE round trip, never a failure)."""
        self.runnables[digest] = None
        self.runnables.move_to_end(digest)
        while len(self.runnables) > self.cache_size:
            self.runnables.popitem(last=False)

    @property
    def takes_tasks(self) -> bool:
        return not self.draining and len(self.running) < self.slots


@dataclass(slots=True)
class ClientState:
    identity: bytes
    environment: dict[str, Any]
    env_key: EnvKey
    expiry: float
    tasks: set[bytes] = field(default_factory=set)  # so a client that leaves is cleaned up without a scan


@dataclass(eq=False, slots=True)
class Task:
    task_id: bytes
    client: bytes
    header: P.TaskHeader
    header_bytes: bytes
    input_blob: bytes
    env_key: EnvKey
    queued_at: float
    queue_deadline: float
    worker: bytes | None = None
    retries_left: int = 0
    streamed: bool = False
    cancelled: bool = False
    queued: bool = False  # waiting in Queues; False marks a stale queue entry to skip


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
    """Waiting tasks, oldest first, one deque per environment key, plus their queue deadlines.

    Why not one deque: a worker can take only tasks of its own environment, and scanning past the
    others on every free slot made dispatch cost grow with the queue. Tasks leaving out of order
    (cancelled, expired) are only marked (``task.queued = False``) and dropped when they reach
    the front, so no leave is O(queue). Deadlines sit in a heap because calls with different
    timeouts do not expire in queue order.
    """

    def __init__(self) -> None:
        self._by_env: dict[EnvKey, deque[Task]] = {}
        self._deadlines: list[tuple[float, int, Task]] = []
        self._pushes = 0  # heap tie-break: Tasks do not compare
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, task: Task, *, front: bool = False) -> None:
        """Queue a task; ``front`` for one that was already waiting or running (requeue, retry)."""
        tasks = self._by_env.get(task.env_key)
        if tasks is None:
            tasks = self._by_env[task.env_key] = deque()
        if front:
            tasks.appendleft(task)
        else:
            tasks.append(task)
        task.queued = True
        self._live += 1
        self._pushes += 1
        heapq.heappush(self._deadlines, (task.queue_deadline, self._pushes, task))
        if len(self._deadlines) > 2 * self._live + _COMPACT_SLACK:
            self._deadlines = [entry for entry in self._deadlines if entry[2].queued]
            heapq.heapify(self._deadlines)

    def pop(self, key: EnvKey) -> Task | None:
        """The oldest waiting task of this environment, or None."""
        tasks = self._by_env.get(key)
        while tasks:
            task = tasks.popleft()
            if task.queued:
                task.queued = False
                self._live -= 1
                return task
        if tasks is not None:  # emptied: an environment nobody uses any more costs nothing
            del self._by_env[key]
        return None

    def discard(self, task: Task) -> None:
        """Take a task out wherever it is (its entry is skipped later)."""
        if not task.queued:
            return
        task.queued = False
        self._live -= 1
        tasks = self._by_env[task.env_key]
        if len(tasks) > 2 * self._live + _COMPACT_SLACK:
            self._by_env[task.env_key] = deque(t for t in tasks if t.queued)

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
        return len(self._by_env.get(key, ()))
