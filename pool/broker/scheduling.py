"""Which worker gets a task: a plain function over plain state, so it is tested without sockets.

The policy (DESIGN §4): only a worker with a free slot, preferring one that already holds the
task's runnable (it skips sending and deserializing it, and keeps its warm HTTP pools busy), then
the least loaded, then the one that waited longest since its last task (spreads ties evenly).
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
    best_key: tuple[bool, float, float] | None = None
    for candidate in candidates:
        if candidate.free <= 0:
            continue
        key = (not candidate.holds_runnable, candidate.busy / candidate.slots, candidate.last_assigned)
        if best_key is None or key < best_key:
            best, best_key = candidate, key
    return best.identity if best is not None else None
