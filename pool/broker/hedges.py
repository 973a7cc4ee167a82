"""Hedges: a duplicate of a running task, started on another worker when the original is slow to
produce its first output (the client decides when: ``RunnableK8s(hedge_after=...)``).

Why the broker judges it and not the client: only the broker knows whether the original is still
queued (a duplicate would only queue behind it), has already streamed (the client would see two
streams), or whether any other worker has a free slot. A hedge runs only now, on a worker other
than the original's; it is never queued and never retried. Otherwise it is answered E_NO_HEDGE
with the reason, and the client keeps waiting for the original. One hedge per task: more would
let one caller occupy every worker with copies of one call. Once sent it is an ordinary task:
CANCEL, results and deadlines work as for any other; the client cancels whichever loses. A hedge
whose worker leaves before it produced anything is answered E_NO_HEDGE too (never queued, never
retried): the original may still be running.

Why a batch or a thread's task is never hedged: a batch's items stream as they finish (a second
copy would interleave), and a thread's task must run where its thread's checkpoint is.
"""

from __future__ import annotations

from pool.broker.scheduling import Candidate, choose_worker
from pool.broker.slots import Slots
from pool.broker.state import EnvKey, WorkerState
from worker import protocol as P


class Hedges(Slots):
    """Whether a hedge may run, and where."""

    def _hedge_target(self, client: bytes, header: P.TaskHeader, key: EnvKey,
                      size: int) -> tuple[WorkerState | None, str]:
        """The worker to run the hedge on now, or None and why not (the E_NO_HEDGE message)."""
        if header.kind == "batch" or header.affinity is not None:
            return None, "a batch or a thread's task is never hedged"
        original = self.tasks.get(bytes.fromhex(header.hedge_of or ""))
        if original is None or original.client != client:
            # The same answer for another connection's task: no way to probe ids that are not yours.
            return None, "no task of this connection has that id (it may have finished)"
        if original.header.hedge_of is not None:
            return None, "a hedge is not hedged again"
        if original.hedged:
            return None, "the original task has been hedged already"
        if original.cancelled:
            return None, "the original task was cancelled"
        if original.header.kind == "batch" or original.header.affinity is not None:
            return None, "a batch or a thread's task is never hedged"
        if original.worker is None:
            return None, "the original task is still waiting for a worker; a copy would wait behind it"
        if original.streamed:
            return None, "the original task has already streamed output"
        free = self._free.get(key)
        if not free:
            return None, "no other worker has a free slot"
        digest, busy_worker = header.digest, original.worker
        chosen = choose_worker([
            Candidate(w.identity, w.slots, w.busy, digest in w.runnables, w.last_assigned)
            for w in free.values() if w.identity != busy_worker and w.fits(size)
        ])
        if chosen is None:
            return None, "no other worker has a free slot"
        original.hedged = True
        return free.pop(chosen), ""
