"""The autoscaler on real local processes (docs/design.md#scaling-and-losing-peers): load adds workers up to max, idle
removes them, scale-down under a load of 1,000 tasks fails none, a pool scaled to zero wakes for a
task. Windows and idle times run on an injected clock that the test moves, so when a scale-down
may happen is exact; only the first test runs on the wall clock, and asserts only what happens
eventually. No timed assertions: timings are printed (pytest -s), and the waits are generous
bounds."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pool import LocalPool
from pool.broker.server import Broker
from pool.client.connection import Connection
from pool.local import LocalPoolScaler
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings
from pool.scaling.policy import Load as AutoscaleLoad
from tests.support.clock import Clock
from tests.support.remote import remote
from tests.support.waiting import seconds_until, wait_for


def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def square(x: int) -> int:
    time.sleep(0.002)
    return x * x


def short(x: int) -> int:
    time.sleep(0.005)  # 1000 of them two at a time take at least 2.5 s: room for a scale-down
    return x * x


CALL_TIMEOUT = 60  # a call may wait in the queue for a worker to start


def ready_workers(pool: LocalPool) -> int:
    return sum(1 for w in pool.status()["workers"] if not w["draining"])


class Load:
    """Keeps ``in_flight`` calls of ``fn(arg)`` running from threads until stopped; counts outcomes."""

    def __init__(self, address: str, fn: Any, arg: Any, in_flight: int) -> None:
        self.runnable = remote(address, fn, timeout=CALL_TIMEOUT)
        self.arg = arg
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(in_flight)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.runnable.invoke(self.arg)
                self.done += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped_at = time.monotonic()
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.mark.timeout(120)
def test_rising_load_grows_the_pool_to_max_and_idle_shrinks_it_back_to_min() -> None:
    """The one test on the wall clock (a LocalPool's own autoscaler): only "eventually", within
    generous bounds; the window and idle times themselves are checked on an injected clock."""
    settings = AutoscaleSettings(min=1, max=4, target=1.0, window=3, idle=60)
    with LocalPool(workers=1, slots=2, autoscale=settings) as pool:
        assert ready_workers(pool) == 1
        with Load(pool.address, slow, 0.3, in_flight=16) as load:
            grew = seconds_until(lambda: ready_workers(pool) == 4, 60, "4 ready workers under load")
        assert load.errors == [] and load.done > 0
        shrank = seconds_until(lambda: pool.workers == 1, 45, "back to 1 worker when idle")
        wait_for(lambda: ready_workers(pool) == 1 and len(pool.status()["workers"]) == 1, 30,
                 "the removed workers to drain and leave")
        history = pool.autoscaler.history
        ups = [(a, b) for _, a, b, _ in history if b > a]
        downs = [(a, b) for _, a, b, _ in history if b < a]
        assert ups and ups[0][0] == 1 and max(b for _, b in ups) == 4, history  # from 1, up to max, never past
        assert downs and downs[-1][1] == 1, history  # down to min, not below
        print(f"\nlocal pool autoscaling: 1 -> 4 ready workers in {grew:.1f}s under load "
              f"({load.done} calls of 0.3 s), 4 -> 1 in {shrank:.1f}s after the load ended (window 3 s)")



class BackgroundBatch:
    """``batch`` of 1000 squares on another thread while the block changes the pool; on leaving,
    every result must be back and right, none failed."""

    def __init__(self, pool: LocalPool, fn: Any, in_flight: int) -> None:
        self.runnable = remote(pool.address, fn, timeout=CALL_TIMEOUT)
        self.in_flight = in_flight
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.results.extend(self.runnable.batch(list(range(1000)), {"max_concurrency": self.in_flight}))
        except BaseException as exc:  # noqa: BLE001 - asserted on leaving the block
            self.errors.append(exc)

    def __enter__(self) -> BackgroundBatch:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread.join(60)
        if exc_info[0] is not None:
            return
        assert not self.thread.is_alive()
        assert self.errors == []
        assert self.results == [x * x for x in range(1000)]


@pytest.mark.timeout(90)
def test_an_explicit_scale_down_from_4_to_1_during_1000_tasks_fails_none() -> None:
    with LocalPool(workers=4, slots=4) as pool:
        with BackgroundBatch(pool, square, in_flight=32):
            wait_for(lambda: pool.status()["counters"]["done"] >= 150, 30, "150 tasks done")
            pool.scale(1, wait=False)
            at_scale = pool.status()["counters"]["done"]
        counters = pool.status()["counters"]
        assert counters["failed"] == 0 and counters["workers_lost"] == 0
        wait_for(lambda: len(pool.status()["workers"]) == 1, 20, "3 workers to drain and leave")
        assert at_scale < 1000, "the scale-down came after the load ended: nothing was tested"
        print(f"\nscaled 4 -> 1 after {at_scale} of 1000 tasks (32 in flight); none failed")


class PolledStatus:
    """A LocalPool's status for ``Autoscaler.poll``, counting reads: each read starts a decision,
    and a read ends the decision before it."""

    def __init__(self, pool: LocalPool) -> None:
        self.pool = pool
        self.reads = 0

    def __call__(self) -> dict[str, Any]:
        status = self.pool.status()
        self.reads += 1
        return status

    def wait_for_decisions(self, count: int) -> None:
        """Until ``count`` whole decisions were made after this call."""
        start = self.reads
        wait_for(lambda: self.reads > start + count, 30, f"{count} autoscaler decisions")


@contextlib.contextmanager
def clocked_autoscaler(pool: LocalPool,
                       settings: AutoscaleSettings) -> Iterator[tuple[Autoscaler, Clock, PolledStatus]]:
    """An autoscaler on ``pool``'s processes with a fake clock; the test starts its ``poll``."""
    clock = Clock()
    autoscaler = Autoscaler(settings, LocalPoolScaler(pool), resync=0, clock=clock)
    try:
        yield autoscaler, clock, PolledStatus(pool)
    finally:
        autoscaler.stop()


@pytest.mark.timeout(90)
def test_the_autoscaler_scaling_down_during_1000_tasks_fails_none() -> None:
    settings = AutoscaleSettings(min=1, max=4, window=60, idle=600, slots_per_worker=4)
    with LocalPool(workers=4, slots=4) as pool, clocked_autoscaler(pool, settings) as (autoscaler, clock, polled):
        # The pool was full a moment ago: the window holds its 4 workers for 60 s of the clock.
        assert autoscaler.step(AutoscaleLoad(queued=0, running=16, slots_per_worker=4)).replicas == 4
        autoscaler.poll(polled, interval=0.05)
        with BackgroundBatch(pool, short, in_flight=2):
            wait_for(lambda: pool.status()["counters"]["done"] >= 150, 30, "150 tasks done")
            polled.wait_for_decisions(3)
            assert pool.workers == 4  # 2 calls in flight want 1 worker, but the clock has not moved
            clock.advance(60)
            wait_for(lambda: pool.workers == 1, 30, "the autoscaler's scale-down once the window passed")
            at_scale = pool.status()["counters"]["done"]
        counters = pool.status()["counters"]
        assert counters["failed"] == 0 and counters["workers_lost"] == 0
        assert at_scale < 1000, "the scale-down came after the load ended: nothing was tested"
        assert [h[:3] for h in autoscaler.history] == [(1060.0, 4, 1)], autoscaler.history
        assert autoscaler.history[-1][3].startswith("scale down")
        print(f"\nautoscaler scaled 4 -> 1 after {at_scale} of 1000 tasks (2 in flight); none failed")


@pytest.mark.timeout(90)
def test_a_pool_scaled_to_zero_wakes_for_a_task_that_waits_in_the_queue() -> None:
    settings = AutoscaleSettings(min=0, max=2, window=0, idle=60)
    with LocalPool(workers=1, slots=2) as pool, clocked_autoscaler(pool, settings) as (autoscaler, clock, polled):
        autoscaler.poll(polled, interval=0.05)
        assert remote(pool.address, slow, timeout=CALL_TIMEOUT).invoke(0) in pool.pids
        polled.wait_for_decisions(3)
        assert pool.workers == 1  # idle, but not for 60 s of the clock
        clock.advance(60)
        wait_for(lambda: pool.workers == 0 and not pool.status()["workers"], 30, "scale to zero")
        clock.advance(3600)
        polled.wait_for_decisions(3)
        assert pool.workers == 0  # it stays asleep without tasks, however long
        started = time.monotonic()
        # warm mode: the task waits in the broker's queue
        pid = remote(pool.address, slow, timeout=CALL_TIMEOUT).invoke(0)
        woke = time.monotonic() - started
        assert pid in pool.pids and pool.workers == 1
        assert [h[1:3] for h in autoscaler.history] == [(1, 0), (0, 1)], autoscaler.history
        assert autoscaler.history[-1][3].startswith("scale from zero")
        print(f"\na task on the empty pool returned in {woke:.1f}s (worker start included)")


# ---------------------------------------------------------------------------- broker-driven


class ProcessScaler:
    """Worker processes connected to an in-process broker: what a Deployment is on a cluster."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.procs: list[subprocess.Popen[bytes]] = []
        self.calls: list[tuple[float, int]] = []
        self.reads = 0  # with resync=0: one per decision

    def current(self) -> int:
        self.reads += 1
        return len(self.procs)

    def scale(self, replicas: int) -> None:
        self.calls.append((time.monotonic(), replicas))
        while len(self.procs) > replicas:
            self.procs.pop().terminate()
        while len(self.procs) < replicas:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "worker", "--connect", self.address, "--slots", "2",
                 "--exit-with-parent", str(os.getpid())], stdin=subprocess.DEVNULL))

    def describe(self) -> str:
        return "test worker processes"

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


@pytest.mark.timeout(60)
def test_a_broker_with_no_workers_wakes_its_autoscaler_as_soon_as_a_task_arrives() -> None:
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    scaler = ProcessScaler(broker.endpoint)
    clock = Clock()
    autoscaler = Autoscaler(AutoscaleSettings(min=0, max=3, window=600, idle=600), scaler, resync=0,
                            clock=clock).start()
    broker.status_hooks.append(autoscaler.observe)
    thread = threading.Thread(target=broker.serve_forever, daemon=True)
    thread.start()
    try:
        clock.advance(3600)  # long past the window and the idle time: still nothing to do at zero
        wait_for(lambda: scaler.reads >= 3, 30, "the broker's ticks to reach the autoscaler")
        assert scaler.calls == []
        submitted = time.monotonic()
        assert remote(broker.endpoint, slow, timeout=CALL_TIMEOUT).invoke(0) == scaler.procs[0].pid
        assert scaler.calls and scaler.calls[0][1] == 1
        print(f"\nbroker at zero workers: scale to 1 requested {scaler.calls[0][0] - submitted:.3f}s after "
              f"the call was made")
    finally:
        Connection.close_all(broker.endpoint)
        autoscaler.stop()
        broker.stop()
        thread.join(5)
        scaler.close()
        broker.close()
