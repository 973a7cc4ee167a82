"""The broker's allowance per client shapes a client's flow; it does not fail a well-behaved caller.

The broker holds at most ``--client-queue-bytes`` of one client's task input. A task that does not
fit *now* is answered busy and waits in the client's connection until one of its own tasks has
finished (or a short back-off passes); the connection also windows its sends by the allowance the
broker names at WELCOME. Only a task that can never fit fails, with ``PoolOverloaded`` naming the
limit and the option that raises it. A task waiting for the allowance honours its timeout (which
then says so) and its cancellation, and never reaches a worker.

Real LocalPools (broker and worker processes), real ZeroMQ. The big tests move 256 MB and 1 GB of
input through the pool: each input object is made once and shared where the test allows.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, PoolOverloaded, TaskTimeout
from pool.client.connection import ALLOWANCE_BYTES_KEYS, Connection
from tests.support.gate import open_gate, wait_at_gate
from tests.support.ports import free_port
from tests.support.remote import remote
from tests.support.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.timeout(600)

MB = 1024 * 1024
BIG = 4 * MB


def length(x: Any) -> int:
    return len(x)


async def tagged_length(x: tuple[int, bytes]) -> int:
    """Which input this was, and how long it was: a result is its own input's, never another's.
    Each task holds its input in the broker a little while (a coroutine: no worker thread waits),
    so that a burst of them fills the client's allowance."""
    await asyncio.sleep(0.2)
    return x[0] * 10**9 + len(x[1])


@pytest.fixture(scope="module")
def default_pool():
    with LocalPool(workers=2) as pool:
        yield pool


def test_a_batch_of_64_distinct_4mb_inputs_all_succeed(default_pool):
    """Before: 16 results and 48 PoolOverloaded (two sub-batches of 8 x 4 MB filled the client's
    64 MB in the broker and the rest were refused)."""
    inputs = [bytes([i]) * (BIG + i) for i in range(64)]
    results = remote(default_pool, length, timeout=300).batch(inputs)
    assert results == [BIG + i for i in range(64)]


def test_256_concurrent_ainvokes_of_4mb_from_one_client_all_succeed(default_pool):
    """Before: most of them failed with PoolOverloaded (the burst filled the client's 64 MB in the
    broker). One 4 MB object is shared by every input."""
    payload = b"x" * BIG
    runnable = remote(default_pool, RunnableLambda(tagged_length), timeout=300)

    async def main() -> list[Any]:
        return await asyncio.gather(*(runnable.ainvoke((i, payload)) for i in range(256)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of 256 failed, the first: {failures[0]!r}"
    assert results == [i * 10**9 + BIG for i in range(256)]


def test_a_client_without_the_allowance_in_welcome_gets_everything_through_busy_answers(default_pool):
    """A connection that does not know the allowance (as with a broker that does not name it)
    sends everything at once: the broker answers busy to what does not fit, and those tasks go
    again as the client's own tasks finish."""
    connection = Connection.shared(default_pool.address)
    connection.ensure_ready()
    connection.broker_info = {k: v for k, v in connection.broker_info.items() if k not in ALLOWANCE_BYTES_KEYS}
    assert connection.client_allowance() is None
    payload = b"y" * BIG
    runnable = remote(default_pool, RunnableLambda(tagged_length), timeout=300)

    async def main() -> list[Any]:
        return await asyncio.gather(*(runnable.ainvoke((i, payload)) for i in range(48)), return_exceptions=True)

    busy_before = default_pool.status()["counters"].get("busy", 0)
    try:
        results = asyncio.run(main())
    finally:
        Connection.close_all(default_pool.address)  # the next test's connection hears WELCOME afresh
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of 48 failed, the first: {failures[0]!r}"
    assert results == [i * 10**9 + BIG for i in range(48)]
    counters = default_pool.status()["counters"]
    assert counters["busy"] > busy_before  # the broker did answer busy, and nothing of it failed


@pytest.fixture(scope="module")
def small_pool():
    """A client allowance of 3 MB: one 2 MB task fits, a second waits, a 4 MB one never fits."""
    with LocalPool(workers=1, broker_args=["--client-queue-bytes", str(3 * MB)]) as pool:
        yield pool


def test_a_task_larger_than_the_client_allowance_fails_with_pool_overloaded_naming_the_limit(small_pool):
    with pytest.raises(PoolOverloaded) as info:
        remote(small_pool, length, timeout=30).invoke(b"z" * BIG)
    message = str(info.value)
    assert "--client-queue-bytes" in message
    assert str(3 * MB) in message


def _ran(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def marking(folder: str):  # type: ignore[no-untyped-def]
    """A task that leaves a file named after its input's tag, so the test sees what ran."""
    def task(x: tuple[str, bytes]) -> int:
        from pathlib import Path

        Path(folder, x[0]).touch()
        return len(x[1])
    return task


def test_a_task_waiting_for_the_allowance_honours_its_timeout_and_cancellation(small_pool, tmp_path):
    """A 2 MB task holds the gate (and 2 of the client's 3 MB in the broker). A second 2 MB task
    then waits in the client: with a timeout it fails with TaskTimeout saying it waited for the
    allowance and how to raise it; cancelled, it is dropped. Neither ever reaches the broker or a
    worker; once the gate opens, the next task runs as usual."""
    port = free_port()
    folder = tmp_path / "ran"
    folder.mkdir()
    holder_bytes = b"h" * (2 * MB)
    gate = remote(small_pool, wait_at_gate(port, limit=120), timeout=120)
    held: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: held.setdefault("out", gate.invoke(holder_bytes)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: small_pool.status()["busy"] == 1, 30, "the gate task to start on the worker")
        submitted = small_pool.status()["counters"]["submitted"]
        connection = Connection.shared(small_pool.address)

        with pytest.raises(TaskTimeout) as info:
            remote(small_pool, marking(str(folder)), timeout=2).invoke(("timed-out", b"t" * (2 * MB)))
        message = str(info.value)
        assert "allowance" in message and "--client-queue-bytes" in message, message

        async def cancel_one() -> None:
            call = asyncio.ensure_future(
                remote(small_pool, marking(str(folder)), timeout=60).ainvoke(("cancelled", b"c" * (2 * MB))))
            await wait_for_async(lambda: connection.waiting_tasks == 1, 30, "the call to wait for the allowance")
            assert not call.done()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert connection.waiting_tasks == 0

        asyncio.run(cancel_one())
        assert small_pool.status()["counters"]["submitted"] == submitted  # neither reached the broker
    finally:
        with open_gate(port):
            thread.join(60)
    assert held["out"][0] == holder_bytes
    assert remote(small_pool, marking(str(folder)), timeout=30).invoke(("after", b"a" * (2 * MB))) == 2 * MB
    assert _ran(folder) == ["after"]


def test_a_waiting_task_goes_once_the_tasks_before_it_finish(small_pool, tmp_path):
    """Two 2 MB tasks on a 3 MB allowance: the second waits for the first (held at the gate) and
    then runs, once; nothing fails and nothing runs twice."""
    port = free_port()
    folder = tmp_path / "ran"
    folder.mkdir()
    gate = remote(small_pool, wait_at_gate(port, limit=120), timeout=120)
    outcomes: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcomes.setdefault("first", gate.invoke(b"1" * (2 * MB))), daemon=True)
    second = threading.Thread(target=lambda: outcomes.setdefault(
        "second", remote(small_pool, marking(str(folder)), timeout=120).invoke(("second", b"2" * (2 * MB)))),
        daemon=True)
    first.start()
    try:
        wait_for(lambda: small_pool.status()["busy"] == 1, 30, "the gate task to start on the worker")
        submitted = small_pool.status()["counters"]["submitted"]
        second.start()
        connection = Connection.shared(small_pool.address)
        wait_for(lambda: connection.waiting_tasks == 1, 30, "the second task to wait for the allowance")
        assert small_pool.status()["counters"]["submitted"] == submitted
        assert not (folder / "second").exists()
    finally:
        with open_gate(port):
            first.join(60)
            second.join(60)
    assert outcomes["first"][0] == b"1" * (2 * MB)
    assert outcomes["second"] == 2 * MB
    assert _ran(folder) == ["second"]
