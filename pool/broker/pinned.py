"""Tasks that wait for one worker: a thread's tasks while the worker holding the thread is busy.

Why a queue per worker and not a place in the environment's shared queue: dispatch from the
shared queue stops at the first task no free worker can take (so a large task is not starved by
smaller ones behind it). A thread's task that can go to one worker only would stop it whenever
that worker is busy, and every other task of the environment would wait behind it while other
workers idle. In its worker's own queue it waits for that worker alone.

Why it cannot starve: a worker with tasks waiting here is out of the free-worker index (see
``Slots._refresh``), so a slot it frees goes to its own waiting tasks first; only once they are
all sent does it take tasks of the shared queue again.

They count against their client key's and the broker's allowances as tasks of the shared queue
do (``Queues.count_outside``). Tasks leaving early (cancelled, expired) are marked
(``task.pinned_to = None``) and skipped when they reach the front, as in ``state.Queues``;
deadlines sit in one heap for all workers.
"""

from __future__ import annotations

import heapq
from collections import deque

from pool.broker.state import Queues, Task, WorkerState

_COMPACT_SLACK = 1024


class Pinned:
    """Every worker's waiting tasks (kept on the worker: ``WorkerState.waiting``) and their deadlines."""

    def __init__(self, queues: Queues) -> None:
        self._queues = queues  # where they count against the allowances (``Queues.count_outside``)
        self._deadlines: list[tuple[float, int, Task]] = []
        self._pushes = 0
        self.live = 0  # tasks waiting for a worker, all workers together

    def __len__(self) -> int:
        return self.live

    def push(self, worker: WorkerState, task: Task, *, front: bool = False) -> None:
        waiting = worker.waiting
        if waiting is None:
            waiting = worker.waiting = deque()
        if front:
            waiting.appendleft(task)
        else:
            waiting.append(task)
        task.pinned_to = worker.identity
        worker.waiting_live += 1
        self.live += 1
        self._queues.count_outside(task.owner, 1)
        self._pushes += 1
        heapq.heappush(self._deadlines, (task.queue_deadline, self._pushes, task))
        if len(self._deadlines) > 2 * self.live + _COMPACT_SLACK:
            self._deadlines = [entry for entry in self._deadlines if entry[2].pinned_to is not None]
            heapq.heapify(self._deadlines)

    def head(self, worker: WorkerState) -> Task | None:
        """The oldest task still waiting for this worker (stale entries before it are dropped)."""
        waiting = worker.waiting
        while waiting:
            task = waiting[0]
            if task.pinned_to == worker.identity:
                return task
            waiting.popleft()
        return None

    def pop(self, worker: WorkerState) -> Task | None:
        task = self.head(worker)
        if task is not None:
            assert worker.waiting is not None
            worker.waiting.popleft()
            self._taken(worker, task)
        return task

    def discard(self, worker: WorkerState | None, task: Task) -> None:
        """Take a task out (its entry is skipped later); ``worker``: the one it waits for, if still known."""
        if task.pinned_to is None:
            return
        if worker is not None and worker.identity == task.pinned_to:
            self._taken(worker, task)
            waiting = worker.waiting
            if waiting is not None and len(waiting) > 2 * worker.waiting_live + _COMPACT_SLACK:
                worker.waiting = deque(t for t in waiting if t.pinned_to == worker.identity)
        else:
            task.pinned_to = None
            self.live -= 1
            self._queues.count_outside(task.owner, -1)

    def take_all(self, worker: WorkerState) -> list[Task]:
        """Every task waiting for this worker, oldest first (it left)."""
        out = [t for t in worker.waiting or () if t.pinned_to == worker.identity]
        for task in out:
            self._taken(worker, task)
        worker.waiting = None
        return out

    def expired(self, now: float) -> list[Task]:
        """Tasks still waiting whose queue deadline is before ``now`` (the caller discards them)."""
        out = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now:
            task = heapq.heappop(deadlines)[2]
            if task.pinned_to is not None:
                out.append(task)
        return out

    def _taken(self, worker: WorkerState, task: Task) -> None:
        task.pinned_to = None
        worker.waiting_live -= 1
        self.live -= 1
        self._queues.count_outside(task.owner, -1)
