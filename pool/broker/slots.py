"""Tasks onto workers' slots: the free-worker index, dispatch, threads' workers, and a task's end.

A task is queued by its environment key and handed out oldest first from that queue only; one
dispatch compares the free workers of that environment, never the queue. Tasks that leave the
queue early are marked and skipped (see ``state.Queues``).

A task of a thread (header ``affinity``) goes to the worker holding its thread (``affinity``),
waiting in that worker's own queue when it is busy (``pinned``); a task of a lost thread is
answered E_THREAD_LOST. A task with no affinity pays one attribute check for this.
"""

from __future__ import annotations

import dataclasses

from pool.broker.affinity import ThreadKey, lost_message, thread_key
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
        if worker.takes_tasks and not worker.waiting_live and self.workers.get(worker.identity) is worker:
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
        input budget it fits; False (nothing done) when it fits none of them now. A thread's task
        whose thread has a holder (or is lost) is handled by ``_route_thread`` instead."""
        header = task.header
        if header.affinity is not None or header.hedge_of is not None:
            if header.hedge_of is not None:  # only a hedge handed back unstarted gets here: never queued
                self._hedge_dropped(task, "its worker handed it back before starting it")
                return True
            if self._route_thread(task):
                return True
        digest, size = header.digest, task.size
        chosen = choose_worker([
            Candidate(w.identity, w.slots, w.busy, digest in w.runnables, w.last_assigned)
            for w in free.values() if w.fits(size)
        ])
        if chosen is None:
            return False
        # popped: re-inserted last by _refresh, so exact ties go to the least recent
        self._run_on(task, free.pop(chosen))
        return True

    def _run_on(self, task: Task, worker: WorkerState) -> None:
        """Send the task to this worker now (it is out of the free-worker index until ``_refresh``)."""
        digest = task.header.digest
        blob = b"" if digest in worker.runnables else self.runnables.get(digest)
        if blob is None:  # evicted from the store while queued: the client sends it again
            self._refresh(worker)
            self._forget(task)
            self._send(task.client, P.error_frames(task.task_id, P.E_NEED_RUNNABLE, NEED_RUNNABLE_MESSAGE))
            return
        task.worker = worker.identity
        worker.occupy(task.task_id, task.header.items, task.size)
        worker.last_assigned = self.now
        # runnable_k8s_queue_wait_seconds: from SUBMIT to now (a retried task's includes its first run).
        self.queue_wait.observe(self.now - task.queued_at)
        self._refresh(worker)
        self._send_task(worker, task, blob)
        if task.header.affinity is not None and task.header.hedge_of is None:
            self.threads.hold(self._thread_key(task), worker.identity, shared=worker.shared_threads)

    # ------------------------------------------------------------------ threads (affinity)

    @staticmethod
    def _thread_key(task: Task) -> ThreadKey:
        """A thread is its tenant's, of one runnable (see ``affinity``)."""
        return thread_key(task.owner, task.header.digest, task.header.affinity or "")

    def _route_thread(self, task: Task) -> bool:
        """A thread's task: to its holder (now, or in that worker's own queue), or answered
        E_THREAD_LOST when its holder is gone. False when the thread has no holder yet: it goes
        to any worker, which becomes its holder."""
        key = self._thread_key(task)
        holder = self.threads.holder(key)
        if holder is None:
            why = self.threads.lost(key)
            if why is None:
                return False
            self._thread_lost(task, why)
            return True
        worker = self.workers.get(holder)
        if worker is None:  # (every way out calls _threads_leave; kept safe all the same)
            self.threads.leave(holder, None)
            return False
        self.counters["threads_pinned"] += 1
        if not worker.waiting_live and worker.takes_tasks and worker.fits(task.size):
            free = self._free.get(worker.env_key)
            if free is not None:
                free.pop(worker.identity, None)
            self._run_on(task, worker)
        else:
            self.pinned.push(worker, task)
            self._refresh(worker)  # out of the free index while its own tasks wait
        return True

    def _serve_pinned(self, worker: WorkerState) -> None:
        """Give the worker's free slots to the tasks waiting for it, oldest first, before any
        task of the shared queue; stop at one its input budget does not take now."""
        pinned = self.pinned
        while worker.waiting_live and worker.takes_tasks:
            task = pinned.head(worker)
            if task is None or not worker.fits(task.size):
                return
            pinned.pop(worker)
            self._run_on(task, worker)

    def _unpin(self, task: Task) -> None:
        """A waiting task leaves its worker's queue early (cancelled, expired): the worker may now
        take the next of its own, or tasks of the shared queue."""
        worker = self.workers.get(task.pinned_to) if task.pinned_to is not None else None
        self.pinned.discard(worker, task)
        if worker is not None:
            self._serve_pinned(worker)
            self._refresh(worker)
            self._dispatch(worker.env_key)

    def _thread_lost(self, task: Task, why: str) -> None:
        """Answer a task of a lost thread (it is forgotten, never retried elsewhere)."""
        self._forget(task)
        self.counters["threads_lost"] += 1
        self.counters["failed"] += task.header.items - task.reported
        self._send(task.client, P.error_frames(task.task_id, P.E_THREAD_LOST,
                                               lost_message(task.header.affinity or "", why)))

    def _requeue(self, task: Task) -> None:
        """A task a worker handed back unstarted (a draining worker's E_REQUEUE): to the front of
        the queue, unless it is a hedge (never queued: E_NO_HEDGE) or a task of a thread lost with
        that worker (E_THREAD_LOST now, not when a slot frees somewhere)."""
        header = task.header
        if header.hedge_of is not None:
            self._hedge_dropped(task, "its worker handed it back before starting it")
            return
        if header.affinity is not None:
            why = self.threads.lost(self._thread_key(task))
            if why is not None:
                self._thread_lost(task, why)
                return
        self.queues.push(task, front=True)
        self._dispatch(task.env_key)

    def _hedge_dropped(self, task: Task, why: str) -> None:
        """A hedge that cannot run after all (its worker left before it produced anything): it is
        not queued nor retried; E_NO_HEDGE tells the client to keep waiting for the original."""
        self._forget(task)
        self.counters["hedges_refused"] += 1
        self._send(task.client, P.error_frames(task.task_id, P.E_NO_HEDGE, f"not hedged: {why}"))

    def _threads_leave(self, worker: WorkerState, why: str) -> None:
        """The worker stops taking tasks for good (gone, or draining): its threads are lost,
        unless they live in a shared store (then forgotten: their next task goes anywhere). Tasks
        waiting for it are answered E_THREAD_LOST, or go back to the shared queue."""
        shared = worker.shared_threads
        clause = f"was held by worker {worker.label}, which {why}"
        self.threads.leave(worker.identity, None if shared else clause)
        if not worker.waiting_live:
            return
        waiting = self.pinned.take_all(worker)
        if shared:
            for task in reversed(waiting):  # each to the front: the oldest ends up first
                self.queues.push(task, front=True)
            self._dispatch(worker.env_key)
        else:
            for task in waiting:
                self._thread_lost(task, clause)

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
            if worker.waiting_live:  # its own waiting tasks first (a thread's, see ``pinned``)
                self._serve_pinned(worker)
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
            if task.pinned_to is not None:
                self._forget(task)
                self._unpin(task)
            else:
                self.queues.discard(task)
                self._forget(task)
        elif not task.cancelled:
            task.cancelled = True  # the slot stays busy until the worker confirms
            self._send(task.worker, [P.PROTOCOL, P.CANCEL, task.task_id])

    def _drop_tenant_if_idle(self, tenant: Tenant) -> None:
        if not tenant.connections and tenant.held_bytes <= 0 and self.tenants.get(tenant.name) is tenant:
            del self.tenants[tenant.name]
