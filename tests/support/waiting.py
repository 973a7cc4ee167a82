"""One way to wait for a condition in the tests: poll it, and fail naming what never happened.

    wait_for(lambda: pool.status()["busy"] > 0, 10, "the task to start on a worker")
    text = wait_for(lambda: scrape(url), 30, "the metrics endpoint", ignore=(OSError,))

``wait_for`` returns the condition's first truthy value (so it can hand back what it found);
after ``timeout`` seconds it raises AssertionError with ``what`` and the last value (or error)
seen. ``wait_for_async`` is the same for a coroutine test (it sleeps with asyncio, so the event
loop keeps running the calls being waited on). Deadlines use the monotonic clock.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL = 0.05


class _Poll:
    def __init__(self, condition: Callable[[], T], timeout: float, what: str,
                 ignore: tuple[type[BaseException], ...]) -> None:
        self.condition, self.timeout, self.what, self.ignore = condition, timeout, what, ignore
        self.deadline = time.monotonic() + timeout
        self.last: object = None

    def check(self) -> T | None:
        try:
            self.last = self.condition()
        except self.ignore as exc:
            self.last = exc
            return None
        return self.last or None  # type: ignore[return-value]

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self) -> AssertionError:
        return AssertionError(f"timed out after {self.timeout:g}s waiting for {self.what} (last: {self.last!r})")


def wait_for(condition: Callable[[], T], timeout: float, what: str, *, interval: float = DEFAULT_INTERVAL,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``condition`` every ``interval`` s until it returns something truthy, and return that.

    Exceptions of the types in ``ignore`` count as "not yet" (the last one is reported); any other
    exception propagates at once.
    """
    poll = _Poll(condition, timeout, what, ignore)
    while True:
        found = poll.check()
        if found:
            return found
        if poll.expired():
            raise poll.failure()
        time.sleep(interval)


def seconds_until(condition: Callable[[], object], timeout: float, what: str, *,
                  interval: float = DEFAULT_INTERVAL) -> float:
    """``wait_for`` that returns how long the wait took (for the figures some tests print)."""
    start = time.monotonic()
    wait_for(condition, timeout, what, interval=interval)
    return time.monotonic() - start


async def wait_for_async(condition: Callable[[], T], timeout: float, what: str, *,
                         interval: float = DEFAULT_INTERVAL, ignore: tuple[type[BaseException], ...] = ()) -> T:
    """``wait_for`` for coroutine tests: between polls the event loop runs."""
    poll = _Poll(condition, timeout, what, ignore)
    while True:
        found = poll.check()
        if found:
            return found
        if poll.expired():
            raise poll.failure()
        await asyncio.sleep(interval)


def wait_for_file(path: str, timeout: float = 20.0) -> None:
    """Wait until ``path`` exists: the gate between a test and a runnable on a local worker (the
    worker imports this module by reference), or between a test and its child process."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.01)
