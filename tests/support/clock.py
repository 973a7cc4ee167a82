"""A clock the tests move by hand, for code that takes an injected clock (the autoscaler): its
windows and idle times pass only when the test says, so no test waits on the wall clock."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
