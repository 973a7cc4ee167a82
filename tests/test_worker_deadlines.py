"""The warm worker's deadline heap forgets finished tasks (a leak the soak benchmark found)."""

from __future__ import annotations

import os

from worker.warm import Deadlines


def test_finished_tasks_leave_the_heap_instead_of_waiting_for_their_deadline():
    deadlines = Deadlines()
    for _ in range(20_000):
        task_id = os.urandom(16)
        deadlines.add(120.0, task_id)  # a two-minute timeout ...
        deadlines.discard(task_id)  # ... on a call that finished at once
    # Before: 20,000 entries (about 200 bytes each) until the deadline passed.
    assert len(deadlines) <= 1025
    assert deadlines.next() is None


def test_only_live_tasks_expire_and_in_deadline_order():
    deadlines = Deadlines()
    done, late, later = b"done" * 4, b"late" * 4, b"later" * 4
    deadlines.add(1.0, done)
    deadlines.add(2.0, late)
    deadlines.add(3.0, later)
    deadlines.discard(done)
    assert deadlines.next() == 2.0
    assert deadlines.expired(2.5) == [late]
    assert deadlines.expired(10.0) == [later]
    assert deadlines.expired(20.0) == []
    deadlines.discard(b"never added")  # no error
