"""A sync caller reads its own reply (``Connection.wait``): while no other caller reads the
socket, the waiting caller does, so a lone caller's reply wakes only its thread.

Real pools, real threads and event loops on one shared connection. Which thread handed a reply
to a sync caller's sink is observed with ``threading.setprofile`` / ``sys.setprofile`` (a
profiler: it only watches). Also: many threads and an asyncio loop at once, a broker restart while
a sync caller waits, a timeout and a stream left early, each followed by calls that still work.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s
from pool.client.connection import Connection
from pool.errors import TaskTimeout
from tests.support.remote import remote
from tests.test_broker_loss import Pool as RestartablePool

pytestmark = pytest.mark.timeout(120)


def double(x: int) -> int:
    return 2 * x


def sleepy_double(x: int) -> int:
    time.sleep(0.3)
    return 2 * x


def slow(x: Any) -> Any:
    time.sleep(20)
    return x


def counting(n: int) -> Iterator[int]:
    yield from range(n)


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalPool]:
    with LocalPool(workers=2, slots=16, threads=16) as p:
        yield p


class Deliveries:
    """The name of the thread that handed each reply to a sync sink (``ThreadSink.deliver``)."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_qualname == "ThreadSink.deliver":
            with self._lock:
                self.threads.append(threading.current_thread().name)

    def __enter__(self) -> Deliveries:
        threading.setprofile(self._profile)  # threads started from now on (the connection's I/O thread)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


def test_a_lone_sync_caller_reads_its_own_replies(pool):
    address = pool.address
    Connection.close_all(address)  # a fresh connection, so its I/O thread starts under the profiler
    with Deliveries() as seen:
        r = remote(address, double)
        results = [r.invoke(i) for i in range(40)]
        streamed = [list(remote(address, RunnableLambda(double)).stream(i)) for i in range(10)]
    Connection.close_all(address)
    assert results == [2 * i for i in range(40)] and streamed == [[2 * i] for i in range(10)]
    mine = seen.threads.count(threading.current_thread().name)
    # Every reply is handed over by the caller itself, but for one the I/O thread may read when it
    # wakes for a heartbeat or has not yet left the socket to the caller (the first call).
    assert mine >= 0.8 * len(seen.threads), seen.threads
    assert len(seen.threads) >= 50


def test_many_threads_and_an_event_loop_share_one_connection(pool):
    r = remote(pool, double)
    s = remote(pool, RunnableLambda(counting))
    errors: list[BaseException] = []
    wrong: list[Any] = []
    lock = threading.Lock()

    def caller(n: int) -> None:
        try:
            for i in range(25):
                x = n * 100 + i
                if (out := r.invoke(x)) != 2 * x:
                    with lock:
                        wrong.append((x, out))
                if i % 5 == 0 and (chunks := list(s.stream(3))) != [0, 1, 2]:
                    with lock:
                        wrong.append(("stream", chunks))
        except BaseException as exc:  # noqa: BLE001 - counted, not raised in a thread
            with lock:
                errors.append(exc)

    async def loop_calls() -> list[Any]:
        outs = await asyncio.gather(*(r.ainvoke(i) for i in range(200)))
        chunks = []
        for _ in range(10):
            chunks.append([c async for c in s.astream(4)])
        return [list(outs), chunks]

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    from_loop = asyncio.run(loop_calls())
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a sync caller hung"
    assert errors == [] and wrong == []
    assert from_loop == [[2 * i for i in range(200)], [[0, 1, 2, 3]] * 10]


def test_a_timeout_and_a_stream_left_early_free_the_reader_for_the_next_call(pool):
    timed = remote(pool, slow, timeout=0.5)
    with pytest.raises(TaskTimeout):
        timed.invoke(1)
    stream = remote(pool, RunnableLambda(counting)).stream(10_000)
    assert next(stream) == 0
    stream.close()  # leaves early: the task is cancelled, the reader let go
    r = remote(pool, double)
    assert [r.invoke(i) for i in range(5)] == [0, 2, 4, 6, 8]
    # An async caller after a sync one left the socket: its reply is read by the I/O thread.
    assert asyncio.run(r.ainvoke(21)) == 42


def test_async_calls_are_answered_while_a_sync_caller_waits_and_after_it_leaves(pool):
    sleepy = remote(pool, sleepy_double)
    quick = remote(pool, double)
    out: list[Any] = []
    waiting = threading.Thread(target=lambda: out.append(sleepy.invoke(4)), daemon=True)
    waiting.start()

    async def while_and_after() -> list[Any]:
        during = await asyncio.gather(*(quick.ainvoke(i) for i in range(20)))
        await asyncio.get_running_loop().run_in_executor(None, waiting.join, 30)
        after = await asyncio.gather(*(quick.ainvoke(i) for i in range(20)))
        return [list(during), list(after)]

    results = asyncio.run(asyncio.wait_for(while_and_after(), 60))
    assert out == [8]
    assert results == [[2 * i for i in range(20)]] * 2


@pytest.fixture
def restartable() -> Iterator[RestartablePool]:
    pool = RestartablePool(workers=1)
    try:
        yield pool
    finally:
        pool.close()


def test_a_sync_caller_waiting_when_the_broker_restarts_gets_its_reply(restartable):
    r = RunnableK8s(bound=RunnableLambda(sleepy_double), pool=restartable.address, mode="warm", retries=1,
                    timeout=60, connect_timeout=30)
    assert r.invoke(1) == 2
    out: list[Any] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            out.append(r.invoke(21))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    time.sleep(0.1)  # let the call reach the worker (it runs 0.3 s); the outcome is asserted either way
    restartable.restart_broker()
    caller.join(60)
    assert not caller.is_alive(), "the sync caller hung through the broker restart"
    assert errors == [] and out == [42]
    assert r.invoke(5) == 10
