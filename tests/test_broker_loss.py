"""Losing the broker while calls are in flight (docs/design.md#scaling-and-losing-peers), with real processes.

A broker and two workers are started here as ``LocalPool`` starts them, on an ``ipc://`` socket
file in a private temporary folder, so that the broker can be killed (SIGKILL: nothing is said
goodbye) and a new one started on the same address, as a restarted broker Pod would be. The
workers re-register with it by themselves; the client resubmits the tasks it had in flight when
their calls have ``retries >= 1`` and nothing of them had reached the caller yet.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.runnables import RunnableGenerator, RunnableLambda

from pool import RunnableK8s
from pool.client.connection import Connection
from pool.errors import AuthenticationFailed, PoolUnavailable
from pool.local import _read_line
from tests.support.gate import open_gate, wait_at_gate
from tests.support.ports import free_port
from tests.support.processes import stop_process
from tests.support.relay import Relay
from tests.support.waiting import wait_for

# How long a caller waits for the new broker: it is a new process, which on a loaded 2-core
# machine (the suite runs on two xdist workers) can take several seconds to start.
PATIENCE = 30.0

CALLERS = 16
CALL_SECONDS = 0.2


def _slow_double(x: int) -> int:
    time.sleep(CALL_SECONDS)
    return x * 2


def _two_part_stream(inputs: Iterator[dict[str, float]]) -> Iterator[str]:
    """Yields "a", then "b" and "c": ``before`` seconds before the first, ``gap`` before the rest."""
    spec: dict[str, float] = {}
    for item in inputs:
        spec = item
    time.sleep(spec["before"])
    yield "a"
    time.sleep(spec["gap"])
    yield "b"
    yield "c"


class Pool:
    """A broker that can be killed and started again on the same address, and two workers."""

    def __init__(self, workers: int = 2, broker_args: list[str] | None = None) -> None:
        self.broker_args = broker_args or []
        self.folder = tempfile.mkdtemp(prefix="rk8s-loss-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.address = f"ipc://{self.folder}/broker.sock"
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.start_broker()
        for _ in range(workers):
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "worker", "--connect", self.address, "--slots", "32",
                 "--threads", str(CALLERS), "--exit-with-parent", str(os.getpid()), "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL))
        self.wait_for_workers(workers)

    def start_broker(self) -> None:
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "pool", "broker", "--bind", self.address, "--announce",
             "--exit-with-parent", str(os.getpid()), "--log-level", "WARNING", *self.broker_args],
            stdout=subprocess.PIPE)
        line = _read_line(self.broker, 30)
        assert line.startswith("READY "), f"the broker did not start: {line!r}"

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait(10)
        stop_process(self.broker)  # closes its pipe

    def restart_broker(self, gap: float = 0.0) -> None:
        """Kill the broker and start a new one ``gap`` seconds later."""
        self.kill_broker()
        time.sleep(gap)
        self.start_broker()

    def ready_workers(self) -> int:
        status = Connection.shared(self.address).status(timeout=2, connect_timeout=2)
        return sum(1 for w in status.get("workers", []) if not w.get("draining"))

    def wait_for_workers(self, count: int, timeout: float = 30) -> None:
        wait_for(lambda: self.ready_workers() >= count, timeout, f"{count} workers to register",
                 ignore=(PoolUnavailable,))

    def close(self) -> None:
        Connection.close_all(self.address)
        for proc in [*self.workers, *([self.broker] if self.broker else [])]:
            if proc.poll() is None:
                proc.kill()  # a worker would otherwise drain, waiting for a broker that may be gone
            stop_process(proc)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_pool() -> Iterator[Pool]:
    pool = Pool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def pool(shared_pool: Pool) -> Pool:
    """The module's pool with a broker running and both workers registered with it."""
    if shared_pool.broker is None or shared_pool.broker.poll() is not None:
        shared_pool.start_broker()
    shared_pool.wait_for_workers(2)
    return shared_pool


Spans = list[tuple[float, float]]


def _callers(remote: RunnableK8s, pool: Pool, calls_each: int,
             gap: float = 0.0) -> tuple[list[Any], list[BaseException], Spans]:
    """CALLERS threads each make ``calls_each`` invoke calls; the broker is killed and restarted
    (``gap`` seconds later) while the first round is in flight. Returns wrong results, errors,
    and each call's span."""
    wrong: list[Any] = []
    errors: list[BaseException] = []
    spans: Spans = []
    lock = threading.Lock()
    started = threading.Barrier(CALLERS + 1)

    def caller(n: int) -> None:
        started.wait()
        for i in range(calls_each):
            x = n * 1000 + i
            begun = time.monotonic()
            try:
                out = remote.invoke(x)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised in a thread
                with lock:
                    errors.append(exc)
                continue
            with lock:
                spans.append((begun, time.monotonic()))
                if out != 2 * x:
                    wrong.append((x, out))

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(CALLERS)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(CALL_SECONDS / 2)  # the first round is on the workers
    killed_at = time.monotonic()
    pool.restart_broker(gap)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a caller hung"
    spans.append((killed_at, killed_at))  # the last entry: when the broker was killed
    return wrong, errors, spans


def _in_flight_at_kill(spans: Spans) -> int:
    killed_at = spans[-1][0]
    return sum(1 for begun, ended in spans[:-1] if begun < killed_at < ended)


@pytest.mark.timeout(60)
def test_sync_calls_in_flight_when_the_broker_is_killed_are_resubmitted_with_retries(pool):
    remote = RunnableK8s(bound=RunnableLambda(_slow_double), pool=pool.address, mode="warm", retries=1,
                         timeout=30, connect_timeout=PATIENCE)
    assert remote.invoke(1) == 2  # connected, the runnable known
    wrong, errors, spans = _callers(remote, pool, calls_each=3)
    assert errors == [] and wrong == []
    assert len(spans) - 1 == CALLERS * 3
    assert _in_flight_at_kill(spans) > 0, "no call was in flight when the broker was killed"


@pytest.mark.timeout(60)
def test_calls_held_behind_a_relay_that_closes_connections_while_no_broker_listens_are_resubmitted(pool):
    """The k8s:// port-forward accepts ZeroMQ's reconnections and closes them at once while no
    broker Pod is ready: to the client, a peer that closes the connection during the handshake,
    which is also how a broker refusing a client's keys looks. A client that was welcomed with
    these keys before must keep holding its calls for the next broker, not fail them all as
    refused (the relay here stands in for the port-forward; the broker is away for a second)."""
    with Relay(pool.address) as relay:
        remote = RunnableK8s(bound=RunnableLambda(_slow_double), pool=relay.address, mode="warm", retries=1,
                             timeout=30, connect_timeout=PATIENCE)
        try:
            assert remote.invoke(1) == 2
            wrong, errors, spans = _callers(remote, pool, calls_each=3, gap=1.0)
        finally:
            Connection.close_all(relay.address)
        assert errors == [] and wrong == []
        assert relay.refused > 0, "no reconnection met the relay without a broker"
        assert _in_flight_at_kill(spans) > 0, "no call was in flight when the broker was killed"


@pytest.mark.timeout(60)
def test_without_retries_calls_in_flight_fail_with_pool_unavailable_saying_why(pool):
    remote = RunnableK8s(bound=RunnableLambda(_slow_double), pool=pool.address, mode="warm", retries=0,
                         timeout=30, connect_timeout=PATIENCE)
    assert remote.invoke(1) == 2
    wrong, errors, _ = _callers(remote, pool, calls_each=2)
    assert wrong == []
    assert errors, "no call was in flight when the broker was killed"
    for error in errors:
        assert isinstance(error, PoolUnavailable), repr(error)
        message = str(error)
        assert "lost the broker connection" in message and "in flight" in message, message
        assert "retries=0" in message and "retries=1" in message, message
    # The pool serves again: the workers re-registered with the new broker.
    pool.wait_for_workers(2)
    assert remote.invoke(5) == 10


@pytest.mark.timeout(60)
def test_async_calls_in_flight_when_the_broker_is_killed_are_resubmitted_with_retries(pool):
    remote = RunnableK8s(bound=RunnableLambda(_slow_double), pool=pool.address, mode="warm", retries=1,
                         timeout=30, connect_timeout=PATIENCE)

    async def main() -> tuple[list[Any], int]:
        assert await remote.ainvoke(1) == 2
        spans: list[tuple[float, float]] = []

        async def caller(n: int) -> list[int]:
            outs = []
            for i in range(3):
                begun = time.monotonic()
                outs.append(await remote.ainvoke(n * 1000 + i))
                spans.append((begun, time.monotonic()))
            return outs

        tasks = [asyncio.ensure_future(caller(n)) for n in range(CALLERS)]
        await asyncio.sleep(CALL_SECONDS / 2)
        killed_at = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, pool.restart_broker)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        in_flight = sum(1 for begun, ended in spans if begun < killed_at < ended)
        return results, in_flight

    results, in_flight = asyncio.run(main())
    assert results == [[2 * (n * 1000 + i) for i in range(3)] for n in range(CALLERS)]
    assert in_flight > 0, "no call was in flight when the broker was killed"


@pytest.mark.timeout(60)
def test_a_stream_that_yielded_chunks_fails_and_one_that_had_not_is_resubmitted(pool):
    remote = RunnableK8s(bound=RunnableGenerator(_two_part_stream), pool=pool.address, mode="warm", retries=1,
                         timeout=30, connect_timeout=PATIENCE)
    assert list(remote.stream({"before": 0, "gap": 0})) == ["a", "b", "c"]
    got: dict[str, list[Any]] = {"started": [], "waiting": []}
    failures: dict[str, BaseException] = {}
    first_chunk = threading.Event()

    def consume(name: str, spec: dict[str, float]) -> None:
        try:
            for chunk in remote.stream(spec):
                got[name].append(chunk)
                if name == "started":
                    first_chunk.set()
        except Exception as exc:  # noqa: BLE001 - checked below
            failures[name] = exc

    # "started" yields "a" at once, then waits; "waiting" yields nothing for 2 s.
    threads = [threading.Thread(target=consume, args=("started", {"before": 0, "gap": 2.0}), daemon=True),
               threading.Thread(target=consume, args=("waiting", {"before": 2.0, "gap": 0}), daemon=True)]
    for thread in threads:
        thread.start()
    assert first_chunk.wait(20)
    pool.restart_broker()
    for thread in threads:
        thread.join(40)
    assert not any(thread.is_alive() for thread in threads), "a stream hung"

    assert got["started"] == ["a"]  # no chunk twice, none from the first run after the loss
    error = failures.get("started")
    assert isinstance(error, PoolUnavailable), repr(error)
    assert "already yielded chunks" in str(error) and "not resubmitted" in str(error), str(error)

    assert "waiting" not in failures, repr(failures.get("waiting"))
    assert got["waiting"] == ["a", "b", "c"]


def _call_while_the_broker_dies(remote: RunnableK8s, pool: Any, connect_timeout: float) -> dict[str, Any]:
    """One call, in a thread, whose broker is killed halfway through and never comes back: its
    value or error, and how long it took."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        begun = time.monotonic()
        try:
            outcome["value"] = remote.invoke(21)
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - begun

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    time.sleep(CALL_SECONDS / 2)
    pool.kill_broker()
    thread.join(connect_timeout + 20)  # a guard against a hang, not a speed check
    assert not thread.is_alive(), "the call hung with no broker"
    return outcome


@pytest.mark.timeout(60)
def test_when_no_broker_comes_back_calls_in_flight_fail_within_the_connect_timeout(pool):
    connect_timeout = 1.5
    Connection.close_all(pool.address)  # the next connection is made with this connect timeout
    remote = RunnableK8s(bound=RunnableLambda(_slow_double), pool=pool.address, mode="warm", retries=1,
                         timeout=30, connect_timeout=connect_timeout)
    assert remote.invoke(1) == 2
    outcome = _call_while_the_broker_dies(remote, pool, connect_timeout)
    error = outcome.get("error")
    assert isinstance(error, PoolUnavailable), repr(outcome)
    message = str(error)
    assert "lost the broker connection" in message and "no runnable-k8s broker answered" in message, message
    assert f"{connect_timeout:g}s" in message, message


@pytest.mark.timeout(60)
def test_behind_a_relay_with_no_broker_calls_in_flight_fail_within_the_connect_timeout_saying_why(pool):
    connect_timeout = 1.5
    with Relay(pool.address) as relay:
        remote = RunnableK8s(bound=RunnableLambda(_slow_double), pool=relay.address, mode="warm", retries=1,
                             timeout=30, connect_timeout=connect_timeout)
        try:
            assert remote.invoke(1) == 2
            outcome = _call_while_the_broker_dies(remote, pool, connect_timeout)
        finally:
            Connection.close_all(relay.address)
    error = outcome.get("error")
    assert isinstance(error, PoolUnavailable) and not isinstance(error, AuthenticationFailed), repr(outcome)
    message = str(error)
    assert "lost the broker connection" in message and f"{connect_timeout:g}s" in message, message
    assert "closed" in message and "during the handshake" in message and "k8s://" in message, message


def _logging(path: str):  # type: ignore[no-untyped-def]
    """A task that appends its input's tag to a file, so the test sees every run of it."""
    def task(x: tuple[str, bytes]) -> int:
        with open(path, "a") as log:
            log.write(x[0] + "\n")
        return len(x[1])
    return task


@pytest.mark.timeout(90)
def test_a_call_waiting_for_the_allowance_when_the_broker_is_killed_goes_to_the_next_one_and_runs_once(tmp_path):
    """A task kept in the client for the allowance was never taken by the broker: losing the
    broker neither fails it (even with retries=0) nor makes it run twice; the next broker gets it.
    The task that held the allowance was in flight with retries=0, and fails saying so."""
    mb = 1024 * 1024
    own = Pool(workers=1, broker_args=["--client-queue-bytes", str(3 * mb)])  # one 2 MB task fits, not two
    port = free_port()
    ran = str(tmp_path / "ran.log")
    outcomes: dict[str, Any] = {}

    def call(name: str, runnable: RunnableK8s, value: Any) -> None:
        try:
            outcomes[name] = runnable.invoke(value)
        except Exception as exc:  # noqa: BLE001 - checked below
            outcomes[name] = exc

    holder = RunnableK8s(bound=RunnableLambda(wait_at_gate(port, limit=60)), pool=own.address, mode="warm",
                         retries=0, timeout=60, connect_timeout=PATIENCE)
    waiter = RunnableK8s(bound=RunnableLambda(_logging(ran)), pool=own.address, mode="warm", retries=0,
                         timeout=60, connect_timeout=PATIENCE)
    threads = [threading.Thread(target=call, args=("holder", holder, b"h" * (2 * mb)), daemon=True),
               threading.Thread(target=call, args=("waiter", waiter, ("waiter", b"w" * (2 * mb))), daemon=True)]
    try:
        threads[0].start()
        wait_for(lambda: Connection.shared(own.address).status()["busy"] == 1, 30, "the holder to start")
        threads[1].start()
        connection = Connection.shared(own.address)
        wait_for(lambda: connection.waiting_tasks == 1, 30, "the second call to wait for the allowance")
        own.restart_broker()
        threads[1].join(60)
        assert not threads[1].is_alive(), "the waiting call hung"
    finally:
        with open_gate(port):
            threads[0].join(60)
        own.close()
    assert outcomes["waiter"] == 2 * mb, repr(outcomes["waiter"])
    with open(ran) as log:
        assert log.read().split() == ["waiter"]  # once, on the new broker
    error = outcomes["holder"]
    assert isinstance(error, PoolUnavailable) and "retries=0" in str(error), repr(error)
