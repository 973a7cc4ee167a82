"""Which worker holds which thread: a bounded map from a thread to the worker that ran its first
task, and a bounded record of threads whose worker is gone.

Why the broker keeps it: a LangGraph graph compiled with an in-memory checkpointer keeps each
thread's state in the worker process that ran it. A resume that lands on another worker finds no
checkpoint and silently starts the graph over. So every task of a thread (a task header's
``affinity``) goes to the worker that ran the thread's first task, while that worker lives.

Why per tenant and runnable: a thread is ``(tenant, runnable digest, affinity)``. Two client keys
that both use ``thread_id="t1"`` have two threads, and one key can neither steer its tasks onto
another key's worker nor learn where another key's threads run; one thread id used with two
graphs is two threads, as it is in LangGraph (each graph has its own checkpointer).

Why tombstones: when a holder leaves (dies, goes silent, is replaced, drains), the threads it
held are gone with its memory. Sending their next task anywhere would restart them silently, so
each lost thread keeps a short record and every later task of it is answered ``E_THREAD_LOST``
with what to do. A worker that keeps its threads in a shared store (its READY says
``"checkpointer": "shared"``) loses nothing when it leaves: its threads are forgotten, and their
next task goes to any worker.

Bounds: both maps are least-recently-used dictionaries of at most ``max_threads`` entries
(65,536 by default, about 300 bytes each with their 16-byte keys: some 40 MB with both full), so
a flood of distinct thread ids costs bounded memory. A thread pushed out of the holders' map
while its worker lives is tombstoned too (its worker may still hold it, but the broker no longer
knows which one: an honest error beats a silent restart); a tombstone pushed out means that
thread id may start afresh.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

#: The most threads the broker follows (and the most lost threads it remembers).
MAX_THREADS = 65_536

ThreadKey = bytes  # 16 bytes of (tenant, runnable digest, affinity): see ``thread_key``


def thread_key(tenant: bytes, digest: str, affinity: str) -> ThreadKey:
    """A thread's key in both maps: a 16-byte BLAKE2b digest of its tenant, runnable and thread
    id, each prefixed by its length (so no two triples read alike). Why a digest and not the
    triple: an entry then costs about 200 bytes whatever the thread id's length (up to 256
    characters) and the key's (a Z85 key is 40): about 300 bytes, 40 MB with both maps full."""
    h = hashlib.blake2b(digest_size=16)
    for part in (tenant, digest.encode(), affinity.encode()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()

FORGOTTEN = ("was forgotten by the broker, which follows the {max} most recently used threads; the worker "
             "that ran it may still hold it, but no task can be sent there any more")


class Threads:
    """Holders and tombstones of threads. Plain data: the rules that use it live in ``slots``."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be 1 or more")
        self.max_threads = max_threads
        self._forgotten = FORGOTTEN.format(max=f"{max_threads:,}")  # one string for every such tombstone
        self._holders: OrderedDict[ThreadKey, bytes] = OrderedDict()  # thread -> routing id of its worker
        self._of_worker: dict[bytes, set[ThreadKey]] = {}  # so a leaving worker's threads are found at once
        self._shared: set[bytes] = set()  # workers whose threads live in a shared store
        # thread -> why it is lost: a clause that follows "thread 'x' of this runnable ..." (one
        # string object shared by every thread of one departure).
        self._lost: OrderedDict[ThreadKey, str] = OrderedDict()

    def __len__(self) -> int:
        """Threads held now (a gauge in STATUS)."""
        return len(self._holders)

    @property
    def lost_known(self) -> int:
        return len(self._lost)

    def holder(self, key: ThreadKey) -> bytes | None:
        """The routing id of the worker that holds this thread, or None."""
        worker = self._holders.get(key)
        if worker is not None:
            self._holders.move_to_end(key)
        return worker

    def lost(self, key: ThreadKey) -> str | None:
        """Why this thread is lost (see the class), or None when it is not."""
        return self._lost.get(key)

    def hold(self, key: ThreadKey, worker: bytes, *, shared: bool) -> None:
        """Note that ``worker`` ran this thread's first task and now holds it. ``shared``: the
        worker keeps its threads in a store every worker reaches (nothing is lost when it leaves)."""
        self._holders[key] = worker
        self._holders.move_to_end(key)
        self._lost.pop(key, None)
        keys = self._of_worker.get(worker)
        if keys is None:
            keys = self._of_worker[worker] = set()
        keys.add(key)
        if shared:
            self._shared.add(worker)
        while len(self._holders) > self.max_threads:
            old, old_worker = self._holders.popitem(last=False)
            old_keys = self._of_worker.get(old_worker)
            if old_keys is not None:
                old_keys.discard(old)
                if not old_keys:
                    del self._of_worker[old_worker]
            if old_worker not in self._shared:
                self._tombstone(old, self._forgotten)

    def leave(self, worker: bytes, why: str | None) -> int:
        """The worker left (or stopped taking tasks): forget its threads, and unless they live in
        a shared store, tombstone each with ``why`` (a clause such as "was held by worker w3 ...,
        which is gone (stopped heartbeating)"). Returns how many threads it held."""
        keys = self._of_worker.pop(worker, None)
        shared = worker in self._shared
        self._shared.discard(worker)
        if not keys:
            return 0
        for key in keys:
            if self._holders.get(key) == worker:
                del self._holders[key]
                if why is not None and not shared:
                    self._tombstone(key, why)
        return len(keys)

    def is_shared(self, worker: bytes) -> bool:
        return worker in self._shared

    def _tombstone(self, key: ThreadKey, why: str) -> None:
        self._lost[key] = why
        self._lost.move_to_end(key)
        while len(self._lost) > self.max_threads:
            self._lost.popitem(last=False)


def lost_message(affinity: str, why: str) -> str:
    """What a task of a lost thread is answered with: what happened, and what the user can do."""
    shown = affinity if len(affinity) <= 80 else affinity[:77] + "..."
    return (f"thread {shown!r} of this runnable {why}; its checkpoint was in that worker's memory and is lost. "
            "Start the thread again under a new thread_id, or give the workers a shared checkpointer so any "
            "worker can resume a thread (RUNNABLE_K8S_CHECKPOINTER, docs/langchain.md#threads)")
