"""Ephemeral mode on the local launcher: a fresh one-shot worker process per call (docs/design.md#what-runs-where)."""

from __future__ import annotations

import os
import time

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

from pool import LocalPool, PoolUnavailable, RunnableK8s, TaskTimeout
from pool.client.connection import Connection
from tests.support.fake_openai import DEFAULT_CHUNKS, FAKE_KEY
from tests.support.meeting import meet
from tests.support.ports import dead_address
from tests.support.processes import child_pids

pytestmark = pytest.mark.timeout(90)


def ephemeral(fn, **kwargs) -> RunnableK8s:
    return RunnableK8s(bound=RunnableLambda(fn), mode="ephemeral", launcher="local", **kwargs)


def test_invoke_runs_in_a_fresh_process_each_time():
    where = ephemeral(lambda _: os.getpid())
    first, second = where.invoke(None), where.invoke(None)
    assert first != second and os.getpid() not in (first, second)
    assert not child_pids()


def test_stream_yields_every_chunk():
    def count(n):
        yield from range(n)

    assert list(ephemeral(count).stream(4)) == [0, 1, 2, 3]


def test_batch_runs_items_in_parallel_processes_and_keeps_order(tmp_path):
    # Each item waits until all three have started: three processes one after another would fail.
    results = ephemeral(meet(str(tmp_path), 3)).batch([1, 2, 3], config={"max_concurrency": 3})
    assert [x for x, _ in results] == [1, 2, 3]
    assert len({pid for _, pid in results}) == 3


def test_the_meeting_point_fails_items_that_run_one_after_another(tmp_path):
    item = meet(str(tmp_path), 2, limit=0.3)
    with pytest.raises(TimeoutError, match="only 1 of 2"):
        item(1)


async def test_async_paths():
    async def double(x):
        return 2 * x

    def count(n):
        yield from range(n)

    assert await ephemeral(double).ainvoke(4) == 8
    assert await ephemeral(double).abatch([1, 2]) == [2, 4]
    assert [c async for c in ephemeral(count).astream(3)] == [0, 1, 2]


def test_remote_errors_keep_their_type_and_return_exceptions_works():
    failing = ephemeral(lambda x: {}[x])
    with pytest.raises(KeyError):
        failing.invoke("missing")
    results = failing.batch(["a", "b"], return_exceptions=True)
    assert all(isinstance(r, KeyError) for r in results)


def test_timeout_stops_the_worker_process():
    slow = ephemeral(lambda _: time.sleep(60), timeout=2)
    with pytest.raises(TaskTimeout):
        slow.invoke(None)
    assert not child_pids()  # the one-shot worker was killed, not left running


def test_a_stream_closed_early_stops_the_worker_process():
    def forever(_):
        while True:
            yield 1
            time.sleep(0.01)

    stream = ephemeral(forever).stream(None)
    assert next(stream) == 1
    stream.close()
    assert not child_pids()


def test_print_in_the_runnable_does_not_corrupt_the_data_stream():
    def chatty(x):
        print("hello from the runnable")
        return x + 1

    assert ephemeral(chatty).invoke(1) == 2


def test_the_seed_chain_runs_ephemerally_with_the_workers_key(fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)  # the one-shot worker inherits it
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-refused-client-key")
    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    chain = prompt | RunnableK8s(bound=llm, mode="ephemeral", launcher="local") | StrOutputParser()
    assert chain.invoke({"question": "Pikachu?"}) == "".join(DEFAULT_CHUNKS)
    assert "".join(chain.stream({"question": "Pikachu?"})) == "".join(DEFAULT_CHUNKS)


def test_auto_mode_falls_back_to_ephemeral_when_the_pool_is_dead(caplog):
    dead = dead_address()
    runnable = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=dead, launcher="local")
    with caplog.at_level("WARNING", logger="runnable_k8s"):
        assert runnable.invoke(None) != os.getpid()
    assert "using ephemeral mode" in caplog.text and dead in caplog.text


def test_auto_mode_uses_the_pool_when_it_is_alive_and_warm_mode_never_falls_back():
    with LocalPool(workers=1) as pool:
        pid = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=pool.address, launcher="local").invoke(None)
        assert pid in pool.pids
    dead = dead_address()
    started = time.monotonic()
    try:
        with pytest.raises(PoolUnavailable):
            RunnableK8s(bound=RunnableLambda(lambda x: x), pool=dead, mode="warm", connect_timeout=2).invoke(1)
    finally:
        Connection.close_all(dead)  # the process's shared connection keeps trying until closed
    assert time.monotonic() - started < 10


def test_auto_mode_uses_ephemeral_while_the_pool_has_no_workers():
    with LocalPool(workers=0) as pool:
        pid = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=pool.address, launcher="local").invoke(None)
        assert pid not in pool.pids and pid != os.getpid()
