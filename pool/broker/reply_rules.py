"""A worker's replies about a task: chunks, relayed callbacks, the result, an error.

Replies travel together (``worker.protocol``, REPLIES): a worker packs the replies it has ready
at one moment into one message, and the broker applies to each entry exactly the rule of the
classic message (``_on_chunk``, ``_on_callback_event``, ``_on_result``), but does the work of a
message (the sender's check, the client's capability) once per message, reads entry headers only,
and sends each client ONE message for its entries: the received frame as is when all of it goes
to one client that reads REPLIES, else a REPLIES packed for it, or classic messages in order for a
client that did not ask for them.
"""

from __future__ import annotations

from pool.broker.events import CallbackEvent, Chunk, Latency, Replies, Result, WorkerError
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
        self._relay_one(event.peer, P.CHUNK, event.task_id, event.chunk)

    def _on_callback_event(self, event: CallbackEvent) -> None:
        self._relay_one(event.peer, P.EVENT, event.task_id, event.data)

    def _on_result(self, event: Result) -> None:
        self._relay_one(event.peer, P.RESULT, event.task_id, event.output)

    def _relay_one(self, peer: bytes, kind: bytes, task_id: bytes, payload: bytes) -> None:
        """A classic CHUNK, EVENT or RESULT: the rule of its one reply, forwarded as it came."""
        if self._known_worker(peer) is None:
            return
        finished: list[Task] = []
        task = self._reply_rule(peer, kind, task_id, payload, 0, len(payload), finished)
        if task is not None:
            self._send(task.client, [P.PROTOCOL, kind, task_id, payload])
        for task in finished:  # reply first, then refill the slot
            self._release(task)

    def _reply_rule(self, peer: bytes, kind: bytes, task_id: bytes, buffer: bytes, start: int, end: int,
                    finished: list[Task]) -> Task | None:
        """The rule of one reply about a task, whichever message carried it (its payload is
        ``buffer[start:end]``, read only to count a batch item): the task whose client gets the
        reply, or None when nobody does.

        A CHUNK marks the task as streamed (it can no longer be retried whole). An EVENT is
        forwarded like a chunk but does not count as streamed: a task that only reported callbacks
        before its worker died may still be retried (its handlers then see the lost attempt's runs
        start without an end, and the retry's runs start afresh); it goes only to a task that asked
        for events. A RESULT ends the task: it is forgotten here (a later reply about it is not
        acted on) and put in ``finished``, whose slots the caller frees once the replies are sent."""
        task = self._task_of(peer, task_id)
        if task is None:
            return None
        if kind == P.CHUNK:
            if task.cancelled:
                return None
            task.streamed = True
            if task.header.kind == "batch":
                self._count_item(task, memoryview(buffer)[start:end])
        elif kind == P.EVENT:
            if task.cancelled or not task.header.events:
                return None
        else:  # RESULT
            finished.append(task)
            self._forget(task)
            if task.cancelled:
                return None
            if task.header.kind == "batch":  # its items were counted one by one
                self.counters["failed"] += task.header.items - task.reported
            else:
                self.counters["done"] += 1
            self._out.append(Latency(self.now - task.queued_at))
        return task

    def _on_replies(self, event: Replies) -> None:
        """Each entry as its classic message would be (see the module's docstring)."""
        peer = event.peer
        if self._known_worker(peer) is None:  # (admission refused it already if its key is no worker's)
            return
        spans, packed, rule = event.spans, event.packed, self._reply_rule
        self.counters["replies_packed"] += 1
        self.counters["entries_relayed"] += len(spans)
        by_client: dict[bytes, list[tuple[bytes, bytes, int, int]]] = {}
        kept = 0
        finished: list[Task] = []
        for span in spans:
            task = rule(peer, span[0], span[1], packed, span[2], span[3], finished)
            if task is None:
                continue
            entries = by_client.get(task.client)
            if entries is None:
                entries = by_client[task.client] = []
            entries.append(span)
            kept += 1
        whole = kept == len(spans) and len(by_client) == 1
        for client, entries in by_client.items():
            self._send_replies(client, entries, packed, whole)
        for task in finished:  # replies first, then refill the slots
            self._release(task)

    def _send_replies(self, client: bytes, entries: list[tuple[bytes, bytes, int, int]], packed: bytes,
                      whole: bool) -> None:
        """One client's entries: as one REPLIES if it reads them (``packed`` as received when it
        is all theirs), else as classic messages in order."""
        state = self.clients.get(client)
        if state is not None and state.environment.get("replies") is True:
            if whole:
                self._send(client, [P.PROTOCOL, P.REPLIES, packed])
                return
            if len(entries) > 1:
                view = memoryview(packed)
                self._send(client, [P.PROTOCOL, P.REPLIES, b"".join([view[s[2] - P.REPLY_ENTRY_HEADER_BYTES:s[3]]
                                                                      for s in entries])])
                return
        for kind, task_id, start, end in entries:
            self._send(client, [P.PROTOCOL, kind, task_id, packed[start:end]])

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
            self._requeue(task)
            return
        self._forget(task)
        if task.cancelled:
            return
        self.counters["failed"] += task.header.items - task.reported
        self._send(task.client, [P.PROTOCOL, P.ERROR, *event.body])

    def _count_item(self, task: Task, chunk: bytes | memoryview) -> None:
        """Count a batch item as done or failed as it goes by (counters count calls, not tasks);
        a malformed one is the client's to refuse, and counts as nothing here."""
        try:
            failed = P.item_failed(chunk, task.header.items)
        except ValueError:
            return
        if task.reported < task.header.items:
            task.reported += 1
            self.counters["failed" if failed else "done"] += 1

