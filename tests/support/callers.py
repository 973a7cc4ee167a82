"""Callers that keep a pool busy while a test breaks something, and count every call's outcome.

Each caller is a thread that calls ``remote.invoke(x)`` in a loop with an input of its own
(``caller * 1_000_000 + i``: never the same twice), and records when each call began and ended,
what came back and any error. Nothing is raised in the threads: the test asserts on the records
afterwards (no failed call, every result matches its input), and computes its figures from them
(which calls were in flight at a moment, when the callers progressed again after it).

    callers = Callers(remote, 32, check=lambda x, out: out["x"] == x)
    callers.start()
    callers.wait_until_each_completed(3, 60)
    ... delete the broker Pod, roll the workers ...
    callers.stop()
    assert callers.errors == [] and callers.wrong == []
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support.waiting import wait_for


@dataclass(frozen=True, slots=True)
class Call:
    caller: int
    x: int
    begun: float
    ended: float
    out: Any = None
    error: BaseException | None = None


class Callers:
    """``count`` threads calling ``remote.invoke`` until stopped (all, or some of them)."""

    def __init__(self, remote: Any, count: int, check: Callable[[int, Any], bool]) -> None:
        self.remote, self.count, self.check = remote, count, check
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stops = [threading.Event() for _ in range(count)]
        self._threads = [threading.Thread(target=self._loop, args=(n,), daemon=True, name=f"caller-{n}")
                         for n in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _loop(self, n: int) -> None:
        i = 0
        while not self._stops[n].is_set():
            x = n * 1_000_000 + i
            i += 1
            begun = time.monotonic()
            try:
                out = self.remote.invoke(x)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, not raised in a thread
                call = Call(n, x, begun, time.monotonic(), error=exc)
            else:
                call = Call(n, x, begun, time.monotonic(), out=out)
            with self._lock:
                self.calls.append(call)

    def stop(self, callers: range | None = None, timeout: float = 120) -> None:
        """Stop these callers (all by default) after their current call, and wait for them."""
        which = range(self.count) if callers is None else callers
        for n in which:
            self._stops[n].set()
        for n in which:
            self._threads[n].join(timeout)
        hung = [n for n in which if self._threads[n].is_alive()]
        assert not hung, f"callers {hung} did not return within {timeout:g}s of being stopped"

    # ------------------------------------------------------------------ what happened

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    @property
    def errors(self) -> list[Call]:
        return [c for c in self.snapshot() if c.error is not None]

    @property
    def wrong(self) -> list[Call]:
        return [c for c in self.snapshot() if c.error is None and not self.check(c.x, c.out)]

    def completed(self, since: float = 0.0, callers: range | None = None) -> dict[int, int]:
        """Successful calls per caller that *began* at or after ``since``."""
        counts = {n: 0 for n in (range(self.count) if callers is None else callers)}
        for call in self.snapshot():
            if call.error is None and call.begun >= since and call.caller in counts:
                counts[call.caller] += 1
        return counts

    def wait_until_each_completed(self, calls: int, timeout: float, since: float = 0.0,
                                  callers: range | None = None) -> None:
        """Wait until every caller (of ``callers``) has ``calls`` successful calls begun since ``since``."""
        wait_for(lambda: min(self.completed(since, callers).values()) >= calls, timeout,
                 f"every caller to complete {calls} calls begun after t={since:.1f}", interval=0.2)

    def in_flight_at(self, moment: float) -> int:
        return sum(1 for c in self.snapshot() if c.begun < moment < c.ended)

    def first_success_after(self, moment: float) -> dict[int, float]:
        """Per caller, when its first successful call that ended after ``moment`` ended."""
        first: dict[int, float] = {}
        for call in self.snapshot():
            if call.error is None and call.ended > moment:
                first[call.caller] = min(first.get(call.caller, call.ended), call.ended)
        return first
