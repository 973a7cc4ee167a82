"""The worker's halves of LangGraph threads, in one process: the runnable cache builds a digest
once however many threads ask at once (tests/test_langgraph_threads.py shows it on a real worker),
and the shared checkpointer goes where a graph's own was, and nowhere else."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from tests.support.waiting import wait_for
from worker import checkpointers
from worker.checkpointers import CheckpointerError, SharedCheckpointer
from worker.tasks import CachedRunnable, NotCached, RunnableCache

pytestmark = pytest.mark.timeout(60)


class State(TypedDict):
    n: int


def graph(checkpointer: Any = None, child: Any = None) -> Any:
    builder = StateGraph(State)
    builder.add_node("inc", lambda state: {"n": state["n"] + 1})
    builder.add_edge(START, "inc")
    if child is not None:
        builder.add_node("child", child)
        builder.add_edge("inc", "child")
        builder.add_edge("child", END)
    else:
        builder.add_edge("inc", END)
    return builder.compile(checkpointer=checkpointer)


# ---------------------------------------------------------------------------- one build per digest


def test_threads_asking_for_a_digest_being_built_wait_for_that_build_and_share_its_object():
    cache = RunnableCache(4)
    started, release = threading.Event(), threading.Event()
    builds: list[CachedRunnable] = []

    def build() -> CachedRunnable:
        started.set()
        assert release.wait(10)
        builds.append(CachedRunnable(RunnableLambda(lambda x: x), on_loop=False))
        return builds[-1]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.load, "d", build)
        assert started.wait(10)
        assert cache.get("d") is None  # the lock is not held while building
        assert cache.loading("d") == 1
        others = [pool.submit(cache.load, "d", build) for _ in range(2)] + [pool.submit(cache.load, "d", None)]
        wait_for(lambda: cache.loading("d") == 4, 10, "the three others to join the build")
        release.set()
        results = [f.result(10) for f in [first, *others]]
    assert len(builds) == 1 and all(r is builds[0] for r in results)
    assert cache.get("d") is builds[0] and cache.loading("d") == 0


def test_a_failed_build_fails_its_waiters_and_is_not_cached():
    cache = RunnableCache(4)
    started, release = threading.Event(), threading.Event()
    calls = []

    def failing() -> CachedRunnable:
        calls.append(1)
        started.set()
        assert release.wait(10)
        raise RuntimeError("cannot rebuild")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(cache.load, "d", failing)]
        assert started.wait(10)
        futures += [pool.submit(cache.load, "d", failing) for _ in range(2)]
        wait_for(lambda: cache.loading("d") == 3, 10, "both waiters to join the build")
        release.set()
        errors = [f.exception(10) for f in futures]
    assert len(calls) == 1 and all(isinstance(e, RuntimeError) and str(e) == "cannot rebuild" for e in errors)
    assert cache.get("d") is None and cache.loading("d") == 0
    with pytest.raises(NotCached):  # no bytes, nothing built: the broker must send them
        cache.load("d", None)


def test_a_full_cache_evicts_what_keeps_no_threads_first():
    cache = RunnableCache(2)
    item = {name: CachedRunnable(RunnableLambda(lambda x: x), on_loop=False, keeps_threads=name.startswith("graph"))
            for name in ("graph-a", "plain-b", "plain-c", "graph-d", "graph-e")}
    for name in ("graph-a", "plain-b", "plain-c"):
        cache.put(name, item[name])
    assert cache.get("graph-a") is item["graph-a"] and cache.get("plain-b") is None  # the older plain one went
    cache.put("graph-d", item["graph-d"])
    assert {n for n in item if cache.get(n) is not None} == {"graph-a", "graph-d"}
    cache.put("graph-e", item["graph-e"])  # all keep threads: the least recently used goes
    assert {n for n in item if cache.get(n) is not None} == {"graph-d", "graph-e"}


# ---------------------------------------------------------------------------- where the shared saver goes


def test_the_shared_saver_replaces_a_graphs_own_wherever_the_graph_sits():
    shared = InMemorySaver()
    alone, bound, in_chain = graph(InMemorySaver()), graph(InMemorySaver()), graph(InMemorySaver())
    stateless = graph()
    child = graph()  # a subgraph: it inherits its parent's checkpointer
    parent = graph(InMemorySaver(), child=child)
    chain = RunnableLambda(lambda x: x) | in_chain
    assert checkpointers.install(alone, shared) == 1 and alone.checkpointer is shared
    assert checkpointers.install(bound.with_retry(), shared) == 1 and bound.checkpointer is shared  # a binding
    configured = graph(InMemorySaver()).with_config(recursion_limit=5)  # a graph's with_config is a graph
    assert checkpointers.install(configured, shared) == 1 and configured.checkpointer is shared
    assert checkpointers.install(chain, shared) == 1 and in_chain.checkpointer is shared
    assert checkpointers.install(stateless, shared) == 0 and stateless.checkpointer is None
    assert checkpointers.install(parent, shared) == 1 and parent.checkpointer is shared and child.checkpointer is None
    assert checkpointers.install(RunnableLambda(lambda x: x), shared) == 0


def test_keeps_threads_means_a_checkpointer_of_its_own():
    shared = InMemorySaver()
    own = graph(InMemorySaver())
    assert checkpointers.keeps_threads(own) and checkpointers.keeps_threads(RunnableLambda(lambda x: x) | own)
    assert not checkpointers.keeps_threads(graph()) and not checkpointers.keeps_threads(RunnableLambda(lambda x: x))
    checkpointers.install(own, shared)
    assert not checkpointers.keeps_threads(own, shared)


# ---------------------------------------------------------------------------- building it on a loop


@pytest.fixture
def run_on_loop() -> Iterator[Any]:
    """A running event loop in a thread, as the worker's: coroutines are run there and waited for."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    yield run
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_the_sqlite_factory_builds_on_the_loop_stores_threads_and_closes(run_on_loop, tmp_path, monkeypatch):
    database = tmp_path / "checkpoints.sqlite"
    monkeypatch.setenv(checkpointers.URL_ENV, str(database))
    shared = SharedCheckpointer.start("worker.checkpointers:sqlite", run_on_loop)
    try:
        app = graph(InMemorySaver())
        shared.install(app)
        config = {"configurable": {"thread_id": "t"}}
        assert run_on_loop(app.ainvoke({"n": 1}, config), 30) == {"n": 2}
        # Another graph object on the same store sees the thread (as another worker would).
        other = graph(InMemorySaver())
        shared.install(other)
        snapshot = run_on_loop(other.aget_state(config), 30)
        assert snapshot.values == {"n": 2}
    finally:
        shared.close(run_on_loop)
    assert database.stat().st_size > 0
    assert not (tmp_path / "checkpoints.sqlite-wal").exists()  # the connection was closed


def test_a_factory_that_gives_no_checkpointer_is_refused(run_on_loop):
    with pytest.raises(CheckpointerError, match="not a LangGraph checkpointer"):
        SharedCheckpointer.start("tests.support.checkpointer_factories:not_a_checkpointer", run_on_loop)
