"""A meeting point for the items of a batch: each item arrives, then waits until all have, so a
test proves they ran at the same time. Run one after another, the first item never sees the
others arrive and fails with TimeoutError after ``limit`` seconds: a sequential run fails, it
does not hang.

The meeting point is a folder (a test's tmp_path) that every process on this machine can reach;
the task is a nested function, so cloudpickle sends it by value and a worker needs no ``tests``
package.

    results = remote.batch([1, 2, 3], config={"max_concurrency": 3})   # remote runs meet(str(tmp_path), 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MEET_WAIT = 30.0  # an item gives up (TimeoutError) if the others have not all arrived by then


def meet(folder: str, parties: int, limit: float = MEET_WAIT) -> Callable[[Any], tuple[Any, int]]:
    """A task that marks its arrival in ``folder``, waits until ``parties`` items have arrived, and
    returns its input and its process id."""

    def task(x: Any) -> tuple[Any, int]:
        import os
        import time
        import uuid

        arrival = os.path.join(folder, f"arrived-{os.getpid()}-{uuid.uuid4().hex}")
        with open(arrival, "x"):
            pass
        deadline = time.monotonic() + limit
        while True:
            arrived = sum(1 for name in os.listdir(folder) if name.startswith("arrived-"))
            if arrived >= parties:
                return x, os.getpid()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"only {arrived} of {parties} items arrived within {limit:g} s: "
                                   "they did not run at the same time")
            time.sleep(0.02)

    return task
