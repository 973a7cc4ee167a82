"""Batching across callers: with ``batch_window_ms`` set, concurrent ``invoke``/``ainvoke`` calls of one
``RunnableK8s`` travel to the pool as one batch, and each caller still gets its own result or error.

One real LocalPool (one worker process) for the module. The remote runnable writes every batch it
runs (its inputs) as one line of a file, so the tests see what the worker saw. Windows are long
(hundreds of ms) so that callers released together by a barrier land in one window on a loaded
machine; nothing here asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.runnables import RunnableConfig, RunnableLambda, RunnableSerializable
from langchain_core.tracers.context import collect_runs
from langchain_openai import OpenAIEmbeddings

from pool import LocalPool, PoolUnavailable
from pool.bench.coalesce import measure
from pool.client import coalescing
from pool.client.calls import DEFAULT_WIRE_CONFIG
from pool.client.connection import Connection
from pool.embeddings import EmbeddingsRunnable
from tests.support.fake_openai import FAKE_KEY
from tests.support.remote import remote

pytestmark = pytest.mark.timeout(120)

WINDOW_MS = 300.0
CALLERS = 16
ROUNDS = 4


class Recorder(RunnableSerializable[Any, Any]):
    """Doubles ``{"n": ...}`` (a bad input raises ValueError); writes each batch it runs, with its
    config's tags, as one JSON line of ``log`` (one ``write`` of a short line: lines never interleave)."""

    log: str

    def _note(self, kind: str, inputs: Sequence[Any], config: Any) -> None:
        first = config[0] if isinstance(config, list) and config else config
        tags = sorted((first or {}).get("tags") or [])
        with open(self.log, "a") as f:
            f.write(json.dumps({"kind": kind, "inputs": list(inputs), "tags": tags}) + "\n")

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        self._note("invoke", [input], config)
        return _double(input)

    def batch_as_completed(self, inputs: Sequence[Any],
                           config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                           return_exceptions: bool = False, **kwargs: Any) -> Iterator[tuple[int, Any]]:
        self._note("batch", inputs, config)
        for index, value in enumerate(inputs):
            try:
                yield index, _double(value)
            except ValueError as exc:
                if not return_exceptions:
                    raise
                yield index, exc

    async def abatch_as_completed(self, inputs: Sequence[Any],
                                  config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                                  return_exceptions: bool = False,
                                  **kwargs: Any) -> AsyncIterator[tuple[int, Any]]:
        for index, outcome in self.batch_as_completed(inputs, config, return_exceptions=return_exceptions):
            yield index, outcome


def _double(value: Any) -> Any:
    if not isinstance(value, dict) or "n" not in value:
        raise ValueError(f"bad input {value!r}")
    return {**value, "n": value["n"] * 2}


def _batches(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def pool() -> Any:
    with LocalPool(workers=1, slots=8, env={"OPENAI_API_KEY": FAKE_KEY}) as local:  # the worker's own key
        yield local


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "batches.jsonl"


def _in_threads(count: int, work: Any) -> list[Any]:
    """``work(i)`` in ``count`` threads released at once; their results (or exceptions) by index."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait(30)
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads)
    return results


# ---------------------------------------------------------------------------- which calls share a batch


def test_calls_share_a_batch_key_only_with_the_same_wire_config_and_kwargs():
    assert coalescing.batch_key(DEFAULT_WIRE_CONFIG, {}) == coalescing.batch_key(DEFAULT_WIRE_CONFIG, {})
    tagged = {"tags": ["a"], "metadata": {}, "configurable": {}, "recursion_limit": 25}
    other = {**tagged, "tags": ["b"]}
    assert coalescing.batch_key(tagged, {}) == coalescing.batch_key(dict(tagged), {})
    assert coalescing.batch_key(tagged, {}) != coalescing.batch_key(other, {})
    assert coalescing.batch_key(tagged, {}) != coalescing.batch_key(DEFAULT_WIRE_CONFIG, {})
    assert coalescing.batch_key(tagged, {"stop": ["x"]}) != coalescing.batch_key(tagged, {})
    assert coalescing.batch_key(tagged, {"stop": object()}) is None  # kwargs that cannot be compared go alone


# ---------------------------------------------------------------------------- through the pool


def test_sixteen_threads_each_get_their_own_results_in_order_and_the_worker_saw_batches(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=WINDOW_MS, max_batch=CALLERS)
    before = coalescing.coalescings_sent()

    def caller(i: int) -> list[Any]:
        return [runnable.invoke({"caller": i, "round": r, "n": i * 100 + r}) for r in range(ROUNDS)]

    results = _in_threads(CALLERS, caller)
    for i, got in enumerate(results):
        assert got == [{"caller": i, "round": r, "n": (i * 100 + r) * 2} for r in range(ROUNDS)], i
    batches, calls = (after - was for after, was in zip(coalescing.coalescings_sent(), before, strict=True))
    assert calls == CALLERS * ROUNDS and batches < calls  # calls were gathered
    seen = _batches(log)
    assert sorted(json.dumps(x, sort_keys=True) for b in seen for x in b["inputs"]) == sorted(
        json.dumps({"caller": i, "round": r, "n": i * 100 + r}, sort_keys=True)
        for i in range(CALLERS) for r in range(ROUNDS))  # each call ran once
    assert max(len(b["inputs"]) for b in seen if b["kind"] == "batch") > 1  # ...several in one batch task
    assert all(len(b["inputs"]) <= CALLERS for b in seen)


def test_sixteen_coroutines_and_sixteen_threads_at_once_each_get_their_own_results(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=WINDOW_MS, max_batch=8)
    before = coalescing.coalescings_sent()

    async def coroutines() -> list[list[Any]]:
        async def caller(i: int) -> list[Any]:
            return [await runnable.ainvoke({"caller": f"a{i}", "n": i * 100 + r}) for r in range(ROUNDS)]
        return list(await asyncio.gather(*(caller(i) for i in range(CALLERS))))

    def work(i: int) -> Any:
        if i == CALLERS:  # one more thread runs the event loop of the sixteen coroutines
            return asyncio.run(coroutines())
        return [runnable.invoke({"caller": f"t{i}", "n": i * 100 + r}) for r in range(ROUNDS)]

    results = _in_threads(CALLERS + 1, work)
    for i in range(CALLERS):
        assert results[i] == [{"caller": f"t{i}", "n": (i * 100 + r) * 2} for r in range(ROUNDS)], i
        assert results[CALLERS][i] == [{"caller": f"a{i}", "n": (i * 100 + r) * 2} for r in range(ROUNDS)], i
    batches, calls = (after - was for after, was in zip(coalescing.coalescings_sent(), before, strict=True))
    assert calls == 2 * CALLERS * ROUNDS and batches < calls
    seen = _batches(log)
    assert max(len(b["inputs"]) for b in seen if b["kind"] == "batch") > 1
    assert all(len(b["inputs"]) <= 8 for b in seen)  # max_batch holds
    for b in seen:  # a batch holds sync callers or async ones, never both: one gatherer per loop
        assert len({x["caller"][0] for x in b["inputs"]}) == 1, b


def test_one_callers_bad_input_raises_in_that_caller_only(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=WINDOW_MS, max_batch=8)
    results = _in_threads(8, lambda i: runnable.invoke("bad" if i == 3 else {"n": i}))
    assert isinstance(results[3], ValueError) and "bad input 'bad'" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [{"n": i * 2} for i in range(8) if i != 3]
    (with_bad,) = [b for b in _batches(log) if "bad" in b["inputs"]]
    assert with_bad["kind"] == "batch" and len(with_bad["inputs"]) > 1  # it shared its task with others


def test_a_failure_of_the_whole_batch_reaches_every_caller_of_it(tmp_path):
    with LocalPool(workers=1) as gone:
        runnable = remote(gone, RunnableLambda(lambda x: x), batch_window_ms=WINDOW_MS, connect_timeout=1)
        assert runnable.invoke(1) == 1  # placed: warm, on this pool
    before = coalescing.coalescings_sent()
    address = gone.address
    try:
        results = _in_threads(6, lambda i: runnable.invoke(i))  # the pool is gone: the batch cannot be sent
    finally:
        Connection.close_all(address)
    assert all(isinstance(result, PoolUnavailable) for result in results), results
    assert len({id(result) for result in results}) == 6  # each caller its own exception object
    assert coalescing.coalescings_sent()[1] - before[1] == 6


def test_a_lone_call_completes_after_the_window_as_a_batch_of_one(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=50)
    before = coalescing.coalescings_sent()
    assert runnable.invoke({"n": 21}) == {"n": 42}
    assert asyncio.run(runnable.ainvoke({"n": 5})) == {"n": 10}
    assert tuple(a - b for a, b in zip(coalescing.coalescings_sent(), before, strict=True)) == (2, 2)
    assert [b["kind"] for b in _batches(log)] == ["invoke", "invoke"]  # a batch of one is a plain task


def test_calls_with_different_configs_are_not_mixed(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=WINDOW_MS, max_batch=16)

    def caller(i: int) -> Any:
        return runnable.invoke({"n": i, "group": "a" if i % 2 else "b"}, {"tags": ["a" if i % 2 else "b"]})

    results = _in_threads(16, caller)
    assert results == [{"n": i * 2, "group": "a" if i % 2 else "b"} for i in range(16)]
    seen = _batches(log)
    assert max(len(b["inputs"]) for b in seen) > 1
    for b in seen:
        assert {x["group"] for x in b["inputs"]} == set(b["tags"]), b  # one config per batch, the callers' own


def test_a_cancelled_coroutine_is_dropped_from_its_batch_and_the_others_are_unaffected(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=1000, max_batch=16)

    async def main() -> list[Any]:
        assert await runnable.ainvoke({"n": -1}) == {"n": -2}  # the place is known: the calls below gather at once
        tasks = [asyncio.ensure_future(runnable.ainvoke({"n": i})) for i in range(6)]
        for _ in range(3):
            await asyncio.sleep(0)  # every task reaches its place in the open batch
        tasks[2].cancel()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    results = asyncio.run(main())
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 2] == [{"n": i * 2} for i in range(6) if i != 2]
    sent = [x["n"] for b in _batches(log) for x in b["inputs"]]
    assert sorted(sent) == [-1, 0, 1, 3, 4, 5]  # the cancelled call never left


def test_a_listened_to_call_bypasses_the_batch_and_still_gets_the_workers_events(pool):
    runnable = remote(pool, RunnableLambda(lambda x: x + 1, name="add_one"), batch_window_ms=WINDOW_MS)
    before = coalescing.coalescings_sent()
    with collect_runs() as collector:
        assert runnable.invoke(1) == 2
    assert coalescing.coalescings_sent() == before  # went alone
    (root,) = collector.traced_runs
    assert [child.name for child in root.child_runs] == ["add_one"]  # the worker's run, relayed back


def test_a_call_of_a_thread_goes_alone_to_its_worker(pool, log):
    runnable = remote(pool, Recorder(log=str(log)), batch_window_ms=WINDOW_MS)
    before = coalescing.coalescings_sent()
    results = _in_threads(4, lambda i: runnable.invoke({"n": i}, {"configurable": {"thread_id": f"t{i}"}}))
    assert results == [{"n": i * 2} for i in range(4)]
    assert coalescing.coalescings_sent() == before  # an affinity places each call alone
    assert [b["kind"] for b in _batches(log)] == ["invoke"] * 4


def test_an_embeddings_model_makes_one_request_per_batch_for_many_callers(pool, tmp_path):
    model = DeterministicFakeEmbedding(size=8)
    runnable = remote(pool, EmbeddingsRunnable(embeddings=model), batch_window_ms=WINDOW_MS, max_batch=16)
    texts = [f"text {i}" for i in range(12)]
    results = _in_threads(12, lambda i: runnable.invoke(texts[i]))
    assert results == [[float(x) for x in model.embed_documents([t])[0]] for t in texts]


def test_openai_embeddings_make_one_request_per_sub_batch_for_many_callers(pool, fake_openai):
    model = OpenAIEmbeddings(model="text-embedding-3-small", base_url=fake_openai.base_url,
                             api_key="sk-not-sent", check_embedding_ctx_length=False)  # the worker uses its own
    runnable = remote(pool, EmbeddingsRunnable(embeddings=model), batch_window_ms=WINDOW_MS, max_batch=16)
    texts = [f"the text of caller {i}" for i in range(12)]
    already = len(fake_openai.embedding_requests)
    results = _in_threads(12, lambda i: runnable.invoke(texts[i]))
    requests = fake_openai.embedding_requests[already:]
    for text, vector in zip(texts, results, strict=True):
        assert vector == pytest.approx(fake_openai.embedding(text), abs=1e-6)
    assert sorted(text for request in requests for text in request["input"]) == sorted(texts)  # each once
    assert len(requests) < len(texts)  # callers shared requests
    assert max(len(request["input"]) for request in requests) > 1


def test_embeddings_runnable_makes_one_embed_documents_call_per_batch():
    requests: list[int] = []

    class Counting(DeterministicFakeEmbedding):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            requests.append(len(texts))
            return super().embed_documents(texts)

    model = Counting(size=4)
    adapter = EmbeddingsRunnable(embeddings=model)
    assert len(adapter.batch(["a", "b", "c"])) == 3
    assert [index for index, _ in adapter.batch_as_completed(["a", "b"])] == [0, 1]
    assert asyncio.run(adapter.abatch(["a", "b", "c", "d"]))[3] == adapter.invoke("d")
    assert requests == [3, 2, 4]  # one request per batch, whatever its size
    with pytest.raises(TypeError, match="pass a str"):
        adapter.invoke(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the bench's workload


def test_the_bench_counts_one_request_per_call_alone_and_fewer_with_a_window(pool):
    alone = measure("in-process", None, callers=8, calls=32, window_ms=None, request_ms=1)
    assert alone.requests_per_call == 1.0 and alone.calls == 32
    gathered = measure("window", pool, callers=8, calls=32, window_ms=WINDOW_MS, request_ms=1, max_batch=8)
    assert gathered.requests_per_call < 1.0  # several callers' calls in one request
    assert gathered.cpu_us_per_call["client"] is not None and "total" in gathered.cpu_us_per_call
