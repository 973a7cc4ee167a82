"""Workers sized for I/O-bound calls: awaiting runnables wait on the worker's event loop
by the hundred; sync code keeps a bounded pool of threads; a draining worker hands back the sync
tasks no thread has started. Real LocalPool processes and real LangChain objects throughout.

None of these tests times anything: concurrency is shown by how many calls are inside a runnable
at once (the broker's busy count while they wait at a gate, or the overlap of their intervals).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from typing import Any

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s
from tests.support.gate import open_gate
from tests.support.ports import free_port
from tests.support.waiting import wait_for
from worker.execution import prefers_event_loop


def gated_chat_model(port: int) -> BaseChatModel:
    """A chat model whose async path waits (without blocking its loop) until 127.0.0.1:``port``
    accepts a connection: an LLM call that takes as long as the test wants. Its sync path would
    block a thread; the worker must not pick it. Defined in a function so cloudpickle sends the
    class by value (workers need no ``tests`` package)."""

    class GatedChatModel(BaseChatModel):
        gate_port: int

        @property
        def _llm_type(self) -> str:
            return "gated"

        def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:
            raise AssertionError("the worker ran the sync path of a model that can await")

        async def _agenerate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                             **kwargs: Any) -> ChatResult:
            import asyncio

            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.gate_port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            text = f"{messages[-1].content} from {os.getpid()}"
            return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])

    return GatedChatModel(gate_port=port)


def test_the_worker_runs_a_chain_with_a_chat_model_on_its_loop_and_plain_functions_on_threads():
    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    assert prefers_event_loop(prompt | gated_chat_model(1))
    assert not prefers_event_loop(RunnableLambda(lambda x: x) | RunnableLambda(str))


@pytest.mark.timeout(120)
def test_one_worker_with_two_threads_holds_sixty_awaiting_llm_calls_at_once():
    """Before: a worker took 8 tasks (one per thread) and the other 52 calls queued in the broker,
    so 60 never ran at once and this test's wait timed out."""
    port = free_port()
    chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | gated_chat_model(port)
    with LocalPool(workers=1, worker_args=["--threads", "2"]) as pool:
        remote = RunnableK8s(bound=chain, pool=pool.address, mode="warm", timeout=90)
        with concurrent.futures.ThreadPoolExecutor(60) as calls:
            futures = [calls.submit(remote.invoke, {"question": f"q{i}"}) for i in range(60)]
            wait_for(lambda: pool.status()["busy"] == 60, 60, "60 calls running on one worker at once")
            assert pool.status()["queued"] == 0
            with open_gate(port):
                answers = [future.result(timeout=60) for future in futures]
    assert sorted(answer.content.split()[0] for answer in answers) == sorted(f"q{i}" for i in range(60))


def overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that share a moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


@pytest.mark.timeout(120)
def test_sync_code_runs_on_at_most_threads_threads_while_the_worker_takes_more_tasks():
    def busy(x: int) -> tuple[float, float]:
        import time

        start = time.time()
        time.sleep(0.3)
        return start, time.time()

    with LocalPool(workers=1, slots=16, worker_args=["--threads", "2"]) as pool:
        remote = RunnableK8s(bound=RunnableLambda(busy), pool=pool.address, mode="warm", timeout=60)
        intervals = remote.batch(list(range(8)), config={"max_concurrency": 8})
    assert len(intervals) == 8
    assert overlap(intervals) <= 2  # the bounded thread pool, not the 16 slots


@pytest.mark.timeout(150)
def test_a_draining_worker_hands_its_unstarted_sync_tasks_to_another_worker():
    """One thread: the first task runs, three wait inside the worker. SIGTERM: the three go back to
    the broker and run on the second worker; the first finishes where it started. Nothing fails."""
    port = free_port()

    def wait_then_pid(x: int) -> tuple[int, int]:
        import os
        import socket
        import time

        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return x, os.getpid()
            except OSError:
                time.sleep(0.1)

    with LocalPool(workers=1, slots=8, worker_args=["--threads", "1"]) as pool:
        first_worker = pool.pids[1]
        remote = RunnableK8s(bound=RunnableLambda(wait_then_pid), pool=pool.address, mode="warm", timeout=120)
        with concurrent.futures.ThreadPoolExecutor(4) as calls:
            futures = [calls.submit(remote.invoke, i) for i in range(4)]
            wait_for(lambda: pool.status()["busy"] == 4, 30, "four tasks on the first worker")
            pool.scale(2)
            os.kill(first_worker, signal.SIGTERM)
            second_worker = next(pid for pid in pool.pids[1:] if pid != first_worker)
            wait_for(lambda: [w["busy"] for w in pool.status()["workers"] if w["pid"] == second_worker] == [3],
                     30, "the three unstarted tasks to move to the second worker")
            with open_gate(port):
                results = [future.result(timeout=60) for future in futures]
    pids = [pid for _, pid in results]
    assert pids.count(first_worker) == 1 and pids.count(second_worker) == 3, results
