"""Tasks onto workers' slots: the free-worker index, dispatch, and a task's end.

A task is queued by its environment key and handed out oldest first from that queue only; one
dispatch compares the free workers of that environment, never the queue. Tasks that leave the
queue early are marked and skipped (see ``state.Queues``).
"""

from __future__ import annotations

import dataclasses

from pool.broker.core_state import CoreState
from pool.broker.scheduling import Candidate, choose_worker
from pool.broker.state import EnvKey, Task, Tenant, WorkerState
from worker import protocol as P

NEED_RUNNABLE_MESSAGE = "send the runnable again"
# A task that waited less than this is sent with its header untouched (re-encoding costs more
# than the worker's deadline loses).
_RETIME_AFTER = 0.01


class Slots(CoreState):
    """Which worker runs which task, and what frees a slot."""

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

    def _cancel(self, task: Task) -> None:
        self.counters["cancelled"] += task.header.items - task.reported
        if task.worker is None:
            self.queues.discard(task)
            self._forget(task)
        elif not task.cancelled:
            task.cancelled = True  # the slot stays busy until the worker confirms
            self._send(task.worker, [P.PROTOCOL, P.CANCEL, task.task_id])

    def _drop_tenant_if_idle(self, tenant: Tenant) -> None:
        if not tenant.connections and tenant.held_bytes <= 0 and self.tenants.get(tenant.name) is tenant:
            del self.tenants[tenant.name]
