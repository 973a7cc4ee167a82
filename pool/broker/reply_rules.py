"""A worker's replies about a task: chunks, relayed callbacks, the result, an error."""

from __future__ import annotations

from pool.broker.events import CallbackEvent, Chunk, Latency, Result, WorkerError
from pool.broker.slots import NEED_RUNNABLE_MESSAGE
from pool.broker.state import Task
from pool.broker.worker_rules import WorkerRules
from worker import protocol as P


class ReplyRules(WorkerRules):
    """Forward what a worker says about a task to its client, and free the slot at its end."""

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

    def _on_chunk(self, event: Chunk) -> None:
        if self._known_worker(event.peer) is None:
            return
        task = self._task_of(event.peer, event.task_id)
        if task is not None and not task.cancelled:
            task.streamed = True
            if task.header.kind == "batch":
                self._count_item(task, event.chunk)
            self._send(task.client, [P.PROTOCOL, P.CHUNK, task.task_id, event.chunk])

    def _on_callback_event(self, event: CallbackEvent) -> None:
        """Forwarded like a chunk, but it does not count as streamed: a task that only reported
        callbacks before its worker died may still be retried (its handlers then see the lost
        attempt's runs start without an end, and the retry's runs start afresh)."""
        if self._known_worker(event.peer) is None:
            return
        task = self._task_of(event.peer, event.task_id)
        if task is not None and not task.cancelled and task.header.events:
            self._send(task.client, [P.PROTOCOL, P.EVENT, task.task_id, event.data])

    def _on_result(self, event: Result) -> None:
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
            self._out.append(Latency(self.now - task.queued_at))
        self._release(task)
        self._forget(task)

    def _on_error(self, event: WorkerError) -> None:
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
