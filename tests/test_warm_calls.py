"""Every way of calling RunnableK8s, through a real local pool (broker + 2 worker processes)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator, RunnableLambda, RunnablePassthrough

from pool import PoolUnavailable, SerializationError, TaskTimeout
from pool.client.connection import Connection
from tests.support.ports import dead_address
from tests.support.remote import remote
from tests.support.waiting import wait_for, wait_for_async, wait_for_file

pytestmark = pytest.mark.timeout(60)


def test_invoke_returns_the_remote_result(local_pool):
    factor = 7
    assert remote(local_pool, lambda x: x * factor).invoke(6) == 42


def test_batch_keeps_input_order_and_spreads_over_both_workers(local_pool):
    def slow_pid(x):
        time.sleep(0.2)
        return x, os.getpid()

    results = remote(local_pool, slow_pid).batch(list(range(8)))
    assert [x for x, _ in results] == list(range(8))
    assert len({pid for _, pid in results}) == 2  # 8 tasks, 4 slots a worker: both were used


def test_batch_honours_max_concurrency(local_pool, tmp_path):
    marker_dir = str(tmp_path)

    def track(x):
        import glob

        Path(marker_dir, f"{x}.running").touch()
        time.sleep(0.1)
        running = len(glob.glob(os.path.join(marker_dir, "*.running")))
        os.remove(os.path.join(marker_dir, f"{x}.running"))
        return running

    peaks = remote(local_pool, track).batch(list(range(6)), config={"max_concurrency": 1})
    assert max(peaks) == 1


def test_batch_return_exceptions_gives_each_item_its_outcome(local_pool):
    def maybe_fail(x):
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    results = remote(local_pool, maybe_fail).batch([0, 1, 2, 3], return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert isinstance(results[3], ValueError)
    with pytest.raises(ValueError, match="odd"):
        remote(local_pool, maybe_fail).batch([0, 1])


def test_remote_exception_keeps_its_type_and_carries_the_remote_traceback(local_pool):
    def lookup(key):
        return {"a": 1}[key]

    with pytest.raises(KeyError) as caught:
        remote(local_pool, lookup).invoke("b")
    assert "in lookup" in caught.value.remote_traceback  # the frame on the worker
    assert caught.value.remote_traceback.rstrip().endswith("KeyError: 'b'")


def test_stream_delivers_the_first_chunk_before_the_last_is_produced(local_pool, tmp_path):
    gate = str(tmp_path / "first-chunk-seen")

    def produce(_):
        yield "first"
        wait_for_file(gate)  # the worker cannot go on until the client has seen "first"
        yield "second"

    stream = remote(local_pool, produce).stream(None)
    assert next(stream) == "first"
    Path(gate).touch()
    assert list(stream) == ["second"]


async def test_astream_delivers_chunks_incrementally(local_pool, tmp_path):
    gate = str(tmp_path / "gate")

    def produce(_):
        yield from range(3)
        wait_for_file(gate)
        yield 3

    chunks = []
    async for chunk in remote(local_pool, produce).astream(None):
        chunks.append(chunk)
        if chunk == 2:
            Path(gate).touch()
    assert chunks == [0, 1, 2, 3]


def test_streaming_works_inside_a_sequence(local_pool):
    def words(text):
        yield from text.split()

    def upper_each(chunks):
        for chunk in chunks:
            yield chunk.upper()

    chain = RunnablePassthrough() | remote(local_pool, words) | RunnableGenerator(upper_each)
    assert list(chain.stream("a b c")) == ["A", "B", "C"]


async def test_ainvoke_and_abatch(local_pool):
    async def double(x):
        await asyncio.sleep(0.01)
        return 2 * x

    runnable = remote(local_pool, double)
    assert await runnable.ainvoke(21) == 42
    assert await runnable.abatch([1, 2, 3]) == [2, 4, 6]
    results = await asyncio.gather(*(runnable.ainvoke(i) for i in range(20)))
    assert results == [2 * i for i in range(20)]


def test_sixteen_threads_share_one_connection(local_pool):
    runnable = remote(local_pool, lambda x: x + 1)
    results: dict[int, list[int]] = {}

    def caller(n):
        results[n] = [runnable.invoke(n * 100 + i) for i in range(20)]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {n: [n * 100 + i + 1 for i in range(20)] for n in range(16)}
    io_threads = [t for t in threading.enumerate() if t.name.startswith(f"runnable-k8s-io {local_pool.address}")]
    assert len(io_threads) == 1


def test_config_tags_metadata_and_configurable_cross_but_live_objects_do_not(local_pool):
    def show(_, config: RunnableConfig):
        return {
            "tags": config.get("tags"),
            "metadata": {k: v for k, v in config.get("metadata", {}).items() if k in ("user", "lock")},
            "configurable": config.get("configurable"),
            "recursion_limit": config.get("recursion_limit"),
        }

    config = {
        "tags": ["t1"],
        "metadata": {"user": "ash", "lock": threading.Lock()},
        "configurable": {"temperature": 0.5},
        "recursion_limit": 7,
    }
    seen = remote(local_pool, show).invoke(None, config)
    assert seen == {"tags": ["t1"], "metadata": {"user": "ash"}, "configurable": {"temperature": 0.5},
                    "recursion_limit": 7}


class EchoKwargs(Runnable):
    """Returns the keyword arguments it was called with (and where it ran)."""

    def invoke(self, input, config=None, **kwargs):
        return {"pid": os.getpid(), **kwargs}


def test_bound_kwargs_reach_the_remote_runnable(local_pool):
    seen = remote(local_pool, EchoKwargs()).bind(stop=["d"]).invoke("hi")
    assert seen["stop"] == ["d"] and seen["pid"] in local_pool.pids


def test_timeout_raises_task_timeout_and_the_pool_still_serves(local_pool):
    runnable = remote(local_pool, lambda s: time.sleep(s) or s, timeout=0.5)
    with pytest.raises(TaskTimeout, match=r"timeout of 0\.5s"):
        runnable.invoke(5)
    assert runnable.invoke(0) == 0


def test_an_unserializable_input_gives_serialization_error(local_pool):
    with pytest.raises(SerializationError, match="input"):
        remote(local_pool, lambda x: x).invoke(threading.Lock())


def test_an_unserializable_output_gives_serialization_error(local_pool):
    with pytest.raises(SerializationError, match="output"):
        remote(local_pool, lambda _: threading.Lock()).invoke(None)


def test_closing_a_stream_early_frees_the_worker_slot(local_pool):
    def endless(_):
        while True:
            time.sleep(0.01)
            yield 1

    stream = remote(local_pool, endless).stream(None)
    assert next(stream) == 1
    stream.close()
    assert_slots_free(local_pool)


async def test_cancelling_an_asyncio_task_frees_the_worker_slot(local_pool):
    async def forever(_):
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(remote(local_pool, forever).ainvoke(None))
    await wait_until_busy(local_pool)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_slots_free(local_pool)


async def wait_until_busy(pool, timeout: float = 10.0) -> None:
    await wait_for_async(lambda: pool.status()["busy"] > 0, timeout, "the task to start on a worker")


def assert_slots_free(pool, timeout: float = 10.0) -> None:
    wait_for(lambda: pool.status()["busy"] == 0, timeout, "every worker slot to be free again")


def test_with_retry_and_with_fallbacks_work_on_the_wrapper(local_pool, tmp_path):
    counter = str(tmp_path / "attempts")

    def flaky(x):
        attempts = int(Path(counter).read_text()) if os.path.exists(counter) else 0
        Path(counter).write_text(str(attempts + 1))
        if attempts < 2:
            raise ConnectionError("try again")
        return x

    retrying = remote(local_pool, flaky).with_retry(stop_after_attempt=3, wait_exponential_jitter=False)
    assert retrying.batch([5]) == [5]
    fallback = remote(local_pool, lambda _: 1 / 0).with_fallbacks([RunnableLambda(lambda _: "fallback")])
    assert fallback.invoke(None) == "fallback"


def test_name_schemas_and_graph_delegate_to_bound(local_pool):
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    wrapped = remote(local_pool, prompt)
    assert wrapped.get_name() == prompt.get_name()
    assert wrapped.get_input_schema().model_json_schema() == prompt.get_input_schema().model_json_schema()
    assert wrapped.get_output_schema().model_json_schema() == prompt.get_output_schema().model_json_schema()
    assert wrapped.config_specs == prompt.config_specs
    names = lambda graph: [node.name for node in graph.nodes.values()]  # noqa: E731
    assert names(wrapped.get_graph()) == names(prompt.get_graph())


def test_batch_as_completed_yields_each_result_as_its_remote_call_finishes(local_pool, tmp_path):
    # RunnableK8s has no batch_as_completed of its own: this is LangChain's (a thread per item,
    # each calling RunnableK8s.invoke). What is checked is what a user gets from it over the pool:
    # each result with its index as soon as that call finishes, in finishing order, every item
    # run on a pool worker. Item i waits for the gate file of item i + 1 (the last waits for
    # none), so the calls finish in the order 2, 1, 0, whatever the machine's speed.
    gates = str(tmp_path)

    def finish_after_next(i):
        if i < 2:
            wait_for_file(os.path.join(gates, f"{i + 1}.done"), timeout=15)
        return i, os.getpid()

    runnable = remote(local_pool, finish_after_next)
    order = []
    for index, (item, pid) in runnable.batch_as_completed([0, 1, 2], config={"max_concurrency": 3}):
        assert index == item and pid in local_pool.pids
        order.append(index)
        Path(gates, f"{index}.done").touch()  # only now may the previous item finish
    assert order == [2, 1, 0]


def fresh_big_runnable() -> tuple[Runnable, int]:
    """A runnable the pool has never seen (a unique closure), ~200 KB when serialized."""
    big = uuid.uuid4().hex + "x" * 200_000
    return RunnableLambda(lambda _: len(big)), len(big)


def runnable_bytes_received(pool) -> int:
    # Bytes of runnable blobs the broker received in SUBMITs (a counter kept by the broker).
    return pool.status()["counters"]["runnable_bytes_received"]


def test_repeated_calls_send_the_runnable_once(local_pool):
    runnable, size = fresh_big_runnable()
    wrapped = remote(local_pool, runnable)
    before = runnable_bytes_received(local_pool)
    assert wrapped.invoke(None) == size
    after_first = runnable_bytes_received(local_pool)
    assert after_first - before >= size  # the first call carried the runnable
    for _ in range(4):
        assert wrapped.invoke(None) == size
    assert runnable_bytes_received(local_pool) == after_first  # the next four carried none of it
    # The control: another runnable is sent (so the counter does count what the calls carry).
    other, other_size = fresh_big_runnable()
    assert remote(local_pool, other).invoke(None) == other_size
    assert runnable_bytes_received(local_pool) - after_first >= other_size


def test_repeated_calls_reuse_the_workers_deserialized_runnable(local_pool):
    # The closure's list lives in the deserialized function: it grows across calls only if the
    # worker keeps that object (a re-deserialized copy would start from an empty list again), and
    # only if the calls go back to the worker that holds it.
    calls: list[int] = []
    tag = uuid.uuid4().hex  # a runnable no worker holds yet

    def count(_):
        calls.append(1)
        return tag, len(calls), os.getpid()

    wrapped = remote(local_pool, count)
    results = [wrapped.invoke(None) for _ in range(5)]
    assert [n for _, n, _ in results] == [1, 2, 3, 4, 5], results
    assert len({pid for _, _, pid in results}) == 1


def test_each_caller_waits_for_a_dead_pool_only_as_long_as_its_own_connect_timeout():
    dead = dead_address()
    patient = remote(dead, lambda x: x, connect_timeout=4)
    hasty = remote(dead, lambda x: x, connect_timeout=0.5)

    try:
        for runnable, limit in ((patient, 10.0), (hasty, 3.0)):  # the second shares the first's connection
            started = time.monotonic()
            with pytest.raises(PoolUnavailable):
                runnable.invoke(1)
            assert time.monotonic() - started < limit
    finally:
        Connection.close_all(dead)
