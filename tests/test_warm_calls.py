"""Every way of calling RunnableK8s, through a real local pool (broker + 2 worker processes)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator, RunnableLambda, RunnablePassthrough

from pool import RunnableK8s, SerializationError, TaskTimeout

pytestmark = pytest.mark.timeout(60)


def remote(local_pool, fn, **kwargs) -> RunnableK8s:
    return RunnableK8s(bound=RunnableLambda(fn) if callable(fn) else fn, pool=local_pool.address, **kwargs)


def wait_for_file(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


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
        for i in range(3):
            yield i
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
    seen = RunnableK8s(bound=EchoKwargs(), pool=local_pool.address).bind(stop=["d"]).invoke("hi")
    assert seen["stop"] == ["d"] and seen["pid"] in local_pool.pids


def test_timeout_raises_task_timeout_and_the_pool_still_serves(local_pool):
    runnable = remote(local_pool, lambda s: time.sleep(s) or s, timeout=0.5)
    with pytest.raises(TaskTimeout, match="timeout of 0.5s"):
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
    deadline = time.monotonic() + timeout
    while pool.status()["busy"] == 0:
        assert time.monotonic() < deadline, "the task never started"
        await asyncio.sleep(0.02)


def assert_slots_free(pool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := pool.status())["busy"]:
        assert time.monotonic() < deadline, f"slots still busy: {status}"
        time.sleep(0.02)


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
    wrapped = RunnableK8s(bound=prompt, pool=local_pool.address)
    assert wrapped.get_name() == prompt.get_name()
    assert wrapped.get_input_schema().model_json_schema() == prompt.get_input_schema().model_json_schema()
    assert wrapped.get_output_schema().model_json_schema() == prompt.get_output_schema().model_json_schema()
    assert wrapped.config_specs == prompt.config_specs
    names = lambda graph: [node.name for node in graph.nodes.values()]  # noqa: E731
    assert names(wrapped.get_graph()) == names(prompt.get_graph())


def test_batch_as_completed_yields_every_item(local_pool):
    runnable = remote(local_pool, lambda x: time.sleep(0.05 * (3 - x)) or x)
    assert sorted(runnable.batch_as_completed([0, 1, 2])) == [(0, 0), (1, 1), (2, 2)]


def test_repeated_calls_send_the_runnable_once(local_pool):
    big = "x" * 200_000  # in the closure: 200 KB of runnable
    runnable = remote(local_pool, lambda _: len(big))
    for _ in range(5):
        assert runnable.invoke(None) == 200_000
    workers = local_pool.status()["workers"]
    assert sum(w["cached_runnables"] for w in workers) >= 1


def test_each_caller_waits_for_a_dead_pool_only_as_long_as_its_own_connect_timeout():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    patient = RunnableK8s(bound=RunnableLambda(lambda x: x), pool=dead, mode="warm", connect_timeout=4)
    hasty = RunnableK8s(bound=RunnableLambda(lambda x: x), pool=dead, mode="warm", connect_timeout=0.5)
    from pool import PoolUnavailable

    for runnable, limit in ((patient, 10.0), (hasty, 3.0)):  # the second shares the first's connection
        started = time.monotonic()
        with pytest.raises(PoolUnavailable):
            runnable.invoke(1)
        assert time.monotonic() - started < limit
