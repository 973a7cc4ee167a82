"""Callers that keep more calls in flight than a pool has slots, so tasks queue: the load the
dashboard and alert tests put through a pool while Prometheus scrapes its broker.

    with Load(remote, callers=8, seconds=0.1, join=70) as load:
        ...                       # load.done counts finished calls; load.errors keeps any failure
    assert load.errors == []

Each caller is a thread calling ``remote.invoke(seconds)`` (a runnable that sleeps that long)
until the block ends; nothing is raised in the threads, the test asserts on ``errors``.
"""

from __future__ import annotations

import threading
from typing import Any


class Load:
    def __init__(self, remote: Any, callers: int, seconds: float, join: float) -> None:
        self.remote, self.seconds, self.join = remote, seconds, join
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]

    def _call(self) -> None:
        while not self.stop.is_set():
            try:
                self.remote.invoke(self.seconds)
                self.done += 1
            except Exception as exc:  # noqa: BLE001 - kept, and the test asserts there are none
                self.errors.append(exc)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.join)
