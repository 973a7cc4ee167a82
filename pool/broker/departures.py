"""A peer leaving: a worker's tasks retried or failed (a thread's answered E_THREAD_LOST), a
client's cancelled, a replaced state dropped. Every way out (BYE, a missed heartbeat, a closed
connection, a routing id taken over, a revoked key) ends here."""

from __future__ import annotations

import logging

from pool.broker.core_state import log
from pool.broker.events import Forget
from pool.broker.slots import Slots
from pool.broker.state import ClientState, WorkerState
from worker import protocol as P


class Departures(Slots):
    """What happens to a peer's state and tasks when it is gone."""

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
            self._out.append(Forget(client.identity))
        if worker is not None:
            self._remove_worker(worker.identity, "lost its connection")
            self._out.append(Forget(worker.identity))

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
        self._threads_leave(worker, f"is gone ({why})")
        lost_thread = None if worker.shared_threads else f"was running on worker {worker.label}, which is gone ({why})"
        running = [self.tasks[t] for t in worker.running if t in self.tasks]
        # Newest first, each to the front: the oldest ends up first in the queue again.
        for task in sorted(running, key=lambda t: t.queued_at, reverse=True):
            task.worker = None
            if task.cancelled:
                self._forget(task)
            elif lost_thread is not None and task.header.affinity is not None:
                # Its thread's checkpoint was in that worker's memory: elsewhere it would restart.
                self._thread_lost(task, lost_thread)
            elif task.header.hedge_of is not None and not task.streamed:
                # A hedge is never queued nor retried: the client waits for its original.
                self._hedge_dropped(task, f"the worker running the hedge {why}")
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
        self._threads_leave(worker, "is gone (unreachable)")
