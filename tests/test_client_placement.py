"""A RunnableK8s decides where its calls run once, at its first call: the environment it read
then keeps applying to it, a new instance reads it again, the copies ``with_bound`` makes share
the decision, and a connection closed under it is made again.

Two real pools (``LocalPool``), told apart by their workers' process ids.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import cloudpickle
import pytest
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s
from pool.client.connection import Connection

pytestmark = pytest.mark.timeout(90)


def where(**settings: object) -> RunnableK8s:
    """A runnable that answers with the process id of the worker it ran on."""
    return RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), timeout=20, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def first() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=4) as pool:
        yield pool


@pytest.fixture(scope="module")
def second() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=4) as pool:
        yield pool


def test_changing_runnable_k8s_pool_after_the_first_call_moves_new_instances_only(first, second, monkeypatch):
    monkeypatch.setenv("RUNNABLE_K8S_POOL", first.address)
    settled = where(mode="warm")
    assert settled.invoke(None) in first.pids
    monkeypatch.setenv("RUNNABLE_K8S_POOL", second.address)
    assert settled.invoke(None) in first.pids  # decided at its first call
    assert where(mode="warm").invoke(None) in second.pids  # a new instance reads the variable again


def test_copies_made_by_with_bound_share_the_decision(first, second, monkeypatch):
    monkeypatch.setenv("RUNNABLE_K8S_POOL", first.address)
    original = where(mode="auto")
    assert original.invoke(None) in first.pids
    monkeypatch.setenv("RUNNABLE_K8S_POOL", second.address)
    copy = original.with_bound(RunnableLambda(lambda _: ("copy", os.getpid())))
    label, pid = copy.invoke(None)
    assert label == "copy" and pid in first.pids


def test_concurrent_first_calls_share_one_decision(first):
    runnable = where(pool=first.address)  # auto: the first call probes the pool
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(runnable.invoke(None))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 6 and set(results) <= set(first.pids)
    placed = runnable._placement.peek()
    assert placed is not None and placed.mode == "warm" and placed.address == first.address


def test_a_connection_closed_under_an_instance_is_made_again_at_its_next_call(first):
    runnable = where(pool=first.address, mode="warm")
    assert runnable.invoke(None) in first.pids
    Connection.close_all(first.address)
    assert runnable.invoke(None) in first.pids


def test_a_pickled_instance_decides_again_where_it_is_unpickled(first):
    runnable = where(pool=first.address, mode="warm")
    assert runnable.invoke(None) in first.pids
    revived = cloudpickle.loads(cloudpickle.dumps(runnable))
    assert revived._placement.peek() is None
    assert revived.invoke(None) in first.pids
