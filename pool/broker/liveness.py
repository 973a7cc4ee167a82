"""Who is still there: heartbeats, BYE, the tick's expiries, failed sends, stalled readers and
closed connections."""

from __future__ import annotations

from pool.broker.core_state import log
from pool.broker.departures import Departures
from pool.broker.events import Bye, ConnectionClosed, Forget, Heartbeat, PeerStalled, SendFailed, Tick
from pool.broker.state import Task
from worker import protocol as P


class Liveness(Departures):
    """Peers that stop answering or reading, and tasks that waited too long."""

    def _on_heartbeat(self, event: Heartbeat) -> None:
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

    def _on_bye(self, event: Bye) -> None:
        if event.peer in self.workers:
            self._remove_worker(event.peer, "said goodbye")
        elif event.peer in self.clients:
            self._remove_client(event.peer)
        self._out.append(Forget(event.peer))

    def _on_tick(self, event: Tick) -> None:
        now = self.now
        self.peer_log.tick(now)
        self.rule_log.tick(now)
        for worker in list(self.workers.values()):
            if worker.expiry < now:
                self._remove_worker(worker.identity, "disconnected" if worker.unreachable else "stopped heartbeating")
                self._out.append(Forget(worker.identity))
            elif not worker.unreachable:
                self._send(worker.identity, [P.PROTOCOL, P.HEARTBEAT])
        for client in list(self.clients.values()):
            if client.expiry < now:
                self._remove_client(client.identity)
                self._out.append(Forget(client.identity))
        for task in self.queues.expired(now):
            waiting = "no workers are connected" if not self.workers else "every worker slot stayed busy"
            self._queue_timeout(task, waiting, "add workers (runnable-k8s scale) or raise the call's timeout")
        if self.pinned.live:
            for task in self.pinned.expired(now):
                holder = self.workers.get(task.pinned_to) if task.pinned_to is not None else None
                label = holder.label if holder is not None else "that worker"
                self._forget(task)
                self._unpin(task)
                self._queue_timeout(task, f"the worker holding its thread, {label}, stayed busy",
                                    "raise the call's timeout, or run fewer calls of one thread at once")

    def _queue_timeout(self, task: Task, waiting: str, advice: str) -> None:
        self._forget(task)
        self.counters["failed"] += task.header.items - task.reported
        self._send(task.client, P.error_frames(task.task_id, P.E_QUEUE_TIMEOUT, (
            f"the task waited {self.now - task.queued_at:.1f}s in the broker's queue and {waiting}; {advice}"
        )))

    def _on_send_failed(self, event: SendFailed) -> None:
        peer, frames = event.peer, event.frames
        log.info("a peer is gone; dropped a %s to it", P.COMMAND_NAMES.get(frames[1], "?"))
        worker = self.workers.get(peer)
        if worker is not None:
            task = self.tasks.get(frames[2]) if frames[1] == P.TASK else None
            if task is not None and task.worker == peer:
                # The worker vanished (without a BYE) before the task reached it: the task never
                # started, so it goes back to the front of the queue for another worker (a hedge
                # is never queued: its client waits for the original).
                log.info("task %s goes back to the queue", task.task_id.hex()[:8])
                worker.vacate(task.task_id)
                task.worker = None
                if task.header.hedge_of is not None:
                    self._hedge_dropped(task, "the worker chosen for the hedge is gone")
                else:
                    self.queues.push(task, front=True)
            self._worker_unreachable(worker)
            self._dispatch(worker.env_key)
        elif peer in self.clients:
            self._remove_client(peer)

    def _on_peer_stalled(self, event: PeerStalled) -> None:
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

    def _on_connection_closed(self, event: ConnectionClosed) -> None:
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
            self._out.append(Forget(peer))
