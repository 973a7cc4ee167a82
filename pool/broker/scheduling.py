"""Which worker gets a task: a plain function over plain state, so it is tested without sockets.

The policy (docs/design.md#the-warm-path): only a worker with a free slot; the least loaded (fraction of its slots
busy, where a batch task of k items counts min(k, slots): ``WorkerState.occupy``); among
equally loaded ones, one that already holds the task's runnable (it skips sending and
deserializing it, and keeps its warm HTTP pools busy); then the one that waited longest since its
last task (spreads ties evenly).

A task of a thread (header ``affinity``) whose thread already has a holder never comes here: it
goes to that worker only (``slots.Slots._route_thread``); its thread's first task does, and the
worker chosen becomes the holder.

Load comes before the runnable since workers take hundreds of tasks each: with the holder first,
every task of a runnable went to the first worker that got it, until all of its 256 slots were
busy, while the others idled (CPU-bound code then ran on one worker's threads). Sending the
runnable once to each worker is cheap next to that; after it, every worker holds it anyway.
"""

from __future__ import annotations

from typing import NamedTuple


class Candidate(NamedTuple):
    """One worker as the policy sees it (a tuple: built for every free worker at every dispatch)."""

    identity: bytes
    slots: int
    busy: int
    holds_runnable: bool
    last_assigned: float

    @property
    def free(self) -> int:
        return self.slots - self.busy


def choose_worker(candidates: list[Candidate]) -> bytes | None:
    """The identity of the worker to run the next task on, or None when every slot is busy."""
    best: Candidate | None = None
    best_key: tuple[float, bool, float] | None = None
    for candidate in candidates:
        if candidate.free <= 0:
            continue
        key = (candidate.busy / candidate.slots, not candidate.holds_runnable, candidate.last_assigned)
        if best_key is None or key < best_key:
            best, best_key = candidate, key
    return best.identity if best is not None else None
