"""LangGraph threads on a pool (docs/langchain.md#threads): a paused thread resumes where it paused.

A graph compiled with ``InMemorySaver()`` keeps a thread's checkpoints in the one graph object
that ran it, in one worker. So every call of a thread goes to the worker that ran its first (the
broker, by the task's ``affinity``, LangGraph's ``thread_id``); when that worker is gone the call
raises ``ThreadLost``, unless the workers share a checkpointer (``RUNNABLE_K8S_CHECKPOINTER``),
which then replaces each graph's own. And a worker builds a runnable once, however many of its
first calls arrive together: two copies of one graph would be two memories, and a thread paused
in the copy the cache did not keep would be lost.

Real graphs with ``interrupt()``, real local pools; a worker is stopped by its PID (a process
of the pool this test started).
"""

from __future__ import annotations

import concurrent.futures
import json
import operator
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
import zmq
from langchain_core.runnables import RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from pool import LocalPool, RunnableK8s, SerializationError
from pool.errors import ThreadLost
from tests.support.build_gate import FAILURE, BuildGate
from tests.support.processes import is_gone, stop_process
from tests.support.remote import remote
from tests.support.waiting import wait_for
from worker import protocol as P

pytestmark = pytest.mark.timeout(180)

ROUNDS = 3  # answers each thread asks for, one interrupt each
SQLITE = "worker.checkpointers:sqlite"


class Interview(TypedDict, total=False):
    question: str
    answers: list[str]
    pids: Annotated[list[int], operator.add]  # the worker that started the thread, then the one that ended it


def interview_graph(gate: BuildGate | None = None) -> Any:
    """START -> start (notes its worker) -> ask (``ROUNDS`` interrupts, one answer each) -> END,
    compiled with an in-memory checkpointer as a notebook would. A resume that reaches a worker
    without the thread's checkpoint starts the graph over: ``state["question"]`` is then missing
    (KeyError), or the answers start again. ``gate``: held by a node, so rebuilding the graph on
    a worker waits at it."""

    def start(state: Interview) -> dict[str, Any]:
        return {"pids": [os.getpid()]}

    def ask(state: Interview) -> dict[str, Any]:
        assert gate is None or gate.folder  # the node holds the gate: the graph's bytes carry it
        answers = [interrupt({"question": state["question"], "round": n}) for n in range(ROUNDS)]
        return {"answers": answers, "pids": [os.getpid()]}

    graph = StateGraph(Interview)
    graph.add_node("start", start)
    graph.add_node("ask", ask)
    graph.add_edge(START, "start")
    graph.add_edge("start", "ask")
    graph.add_edge("ask", END)
    return graph.compile(checkpointer=InMemorySaver())


def thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": f"{name}-{uuid.uuid4()}"}}


def paused_at(state: dict[str, Any]) -> dict[str, Any]:
    """The value of the interrupt a call stopped at."""
    interrupts = state["__interrupt__"]
    assert len(interrupts) == 1, state
    return interrupts[0].value  # type: ignore[no-any-return]


def interview(runnable: RunnableK8s, questions: list[str], configs: list[dict[str, Any]],
              first: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Ask each question in its own thread, all threads together (one batch per round), answering
    each interrupt; the final states. ``first``: the first round's states, when already asked."""
    states = first if first is not None else runnable.batch([{"question": q} for q in questions], configs)
    assert [paused_at(s) for s in states] == [{"question": q, "round": 0} for q in questions]
    for n in range(1, ROUNDS + 1):
        states = runnable.batch([Command(resume=f"{q}-{n - 1}") for q in questions], configs)
        if n < ROUNDS:
            assert [paused_at(s) for s in states] == [{"question": q, "round": n} for q in questions]
    return states


def stop_worker(pool: LocalPool, pid: int) -> None:
    """Stop one worker of ``pool`` (it drains, says goodbye and exits) and wait until the broker
    no longer counts it."""
    assert pid in pool.pids[1:], f"{pid} is not one of this pool's workers {pool.pids[1:]}"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: is_gone(pid), 60, f"worker {pid} to exit")
    wait_for(lambda: all(w["pid"] != pid for w in pool.status()["workers"]), 30, f"the broker to drop worker {pid}")


@pytest.fixture
def shared_sqlite(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The workers' environment for the shared SQLite checkpointer, on a file removed afterwards."""
    database = tmp_path / "checkpoints.sqlite"
    yield {"RUNNABLE_K8S_CHECKPOINTER": SQLITE, "RUNNABLE_K8S_CHECKPOINTER_URL": str(database)}
    for path in tmp_path.glob("checkpoints.sqlite*"):
        path.unlink()


# ---------------------------------------------------------------------------- threads find their worker


def test_two_threads_paused_in_one_batch_on_two_workers_each_resume_with_their_own_state():
    # One slot per worker: the two threads' first calls, sent together, start on two workers.
    with LocalPool(workers=2, slots=1) as pool:
        graph = remote(pool, interview_graph())
        configs = [thread("alice"), thread("bob")]
        first = graph.batch([{"question": "alice"}, {"question": "bob"}], configs)
        starters = [s["pids"][0] for s in first]
        assert len(set(starters)) == 2, f"both threads started on one worker {starters}"
        assert [paused_at(s) for s in first] == [{"question": q, "round": 0} for q in ("alice", "bob")]
        # Each thread resumed on its own, twice in a row (any worker but its own would start it over) ...
        for question, config in zip(["alice", "bob"], configs, strict=True):
            for n in range(1, ROUNDS):
                state = graph.invoke(Command(resume=f"{question}-{n - 1}"), config)
                assert paused_at(state) == {"question": question, "round": n}
        # ... then both at once.
        states = graph.batch([Command(resume=f"{q}-{ROUNDS - 1}") for q in ("alice", "bob")], configs)
    assert [s["answers"] for s in states] == [[f"alice-{n}" for n in range(ROUNDS)],
                                              [f"bob-{n}" for n in range(ROUNDS)]]
    # Each thread ended on the worker it started on.
    assert [s["pids"] for s in states] == [[pid, pid] for pid in starters]


def test_a_resume_after_its_worker_stopped_raises_thread_lost_saying_what_to_do():
    with LocalPool(workers=2, slots=2) as pool:
        graph = remote(pool, interview_graph())
        config = thread("carol")
        holder = graph.invoke({"question": "carol"}, config)["pids"][0]
        stop_worker(pool, holder)
        with pytest.raises(ThreadLost) as caught:
            graph.invoke(Command(resume="carol-0"), config)
        message = str(caught.value)
        assert "memory" in message and "RUNNABLE_K8S_CHECKPOINTER" in message, message
        # The pool goes on: a new thread runs on the worker that is left.
        [state] = interview(graph, ["dave"], [thread("dave")])
        assert state["answers"] == [f"dave-{n}" for n in range(ROUNDS)] and holder not in state["pids"]


def test_with_the_shared_sqlite_checkpointer_a_thread_resumes_on_another_worker(shared_sqlite):
    with LocalPool(workers=2, slots=2, env=shared_sqlite) as pool:
        graph = remote(pool, interview_graph())  # compiled with InMemorySaver(), as before
        config = thread("erin")
        first = graph.invoke({"question": "erin"}, config)
        holder = first["pids"][0]
        stop_worker(pool, holder)
        [state] = interview(graph, ["erin"], [config], [first])
    assert state["answers"] == [f"erin-{n}" for n in range(ROUNDS)]
    assert state["pids"][0] == holder and state["pids"][1] != holder  # paused on one worker, ended on another
    assert Path(shared_sqlite["RUNNABLE_K8S_CHECKPOINTER_URL"]).stat().st_size > 0


def test_a_full_cache_drops_other_runnables_before_a_graph_that_keeps_paused_threads():
    with LocalPool(workers=1, slots=2, worker_args=["--cache-size", "1"]) as pool:
        graph = remote(pool, interview_graph())
        config = thread("heidi")
        first = graph.invoke({"question": "heidi"}, config)
        for n in range(3):  # three other runnables through a cache of one
            assert remote(pool, lambda x, n=n: x + n).invoke(1) == 1 + n
        [state] = interview(graph, ["heidi"], [config], [first])
    assert state["answers"] == [f"heidi-{n}" for n in range(ROUNDS)]


# ---------------------------------------------------------------------------- one build per runnable


def concurrently(pool: LocalPool, calls: list[Any], gate: BuildGate) -> list[concurrent.futures.Future[Any]]:
    """Start ``calls`` together, wait until the broker counts them all on the worker (the first
    one building the runnable at the gate), then open the gate; their futures."""
    executor = concurrent.futures.ThreadPoolExecutor(len(calls))
    try:
        futures = [executor.submit(call) for call in calls]
        wait_for(lambda: pool.status()["busy"] == len(calls), 30, f"{len(calls)} calls to reach the worker")
        gate.open()
        concurrent.futures.wait(futures, 60)
    finally:
        executor.shutdown(wait=True)
    return futures


def test_one_worker_builds_a_graph_once_under_concurrent_first_calls_and_both_threads_resume(tmp_path):
    gate = BuildGate(tmp_path)
    with LocalPool(workers=1, slots=4) as pool:
        graph = remote(pool, interview_graph(gate))
        configs = [thread("frank"), thread("grace")]
        futures = concurrently(pool, [lambda c=c, q=q: graph.invoke({"question": q}, c)
                                      for q, c in zip(["frank", "grace"], configs, strict=True)], gate)
        first = [f.result() for f in futures]
        states = interview(graph, ["frank", "grace"], configs, first)
    assert [s["answers"] for s in states] == [[f"frank-{n}" for n in range(ROUNDS)],
                                              [f"grace-{n}" for n in range(ROUNDS)]]
    assert gate.builds() == 1


def test_concurrent_first_calls_share_one_object(tmp_path):
    gate = BuildGate(tmp_path)
    with LocalPool(workers=1, slots=4) as pool:
        runnable = remote(pool, RunnableLambda(lambda x: id(gate)))
        futures = concurrently(pool, [lambda: runnable.invoke(0)] * 4, gate)
        identities = {f.result() for f in futures}
        assert len(identities) == 1 and runnable.invoke(0) in identities
    assert gate.builds() == 1


def test_a_failed_build_fails_every_waiting_call_with_its_error_and_is_not_kept(tmp_path):
    gate = BuildGate(tmp_path)
    gate.fail()
    with LocalPool(workers=1, slots=4) as pool:
        runnable = remote(pool, RunnableLambda(lambda x: x + 1 if gate else 0))
        futures = concurrently(pool, [lambda: runnable.invoke(1)] * 3, gate)
        errors = [f.exception() for f in futures]
        assert all(isinstance(e, SerializationError) and FAILURE in str(e) for e in errors), errors
        # (How many builds failed depends on whether each call reached the worker before the one
        # build failed: tests/test_checkpointers.py counts that in one process.)
        failed = gate.builds()
        gate.fail(False)
        assert runnable.invoke(1) == 2  # built again, this time for good
        assert gate.builds() == failed + 1


# ---------------------------------------------------------------------------- the checkpointer at start


def start_worker(address: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "worker", "--connect", address, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("spec", "said"), [
    ("no_such_package.store:factory", "could not import 'no_such_package.store'"),
    ("tests.support.checkpointer_factories:missing", "has no 'missing'"),
    ("tests.support.checkpointer_factories", "is not an import path"),
    ("tests.support.checkpointer_factories:sync_sqlite", "has no async methods"),
    ("tests.support.checkpointer_factories:not_a_checkpointer", "not a LangGraph checkpointer"),
    ("tests.support.checkpointer_factories:broken", "the checkpoint store refused the connection"),
    (SQLITE, "needs RUNNABLE_K8S_CHECKPOINTER_URL"),
])
def test_a_worker_whose_checkpointer_cannot_be_built_does_not_start_and_says_why(tmp_path, spec, said):
    proc = start_worker(f"ipc://{tmp_path}/nobody.sock", "--checkpointer", spec,
                        env={"RUNNABLE_K8S_CHECKPOINTER_URL": ""})
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 2 and said in stderr, stderr


def test_a_worker_with_a_shared_checkpointer_says_so_in_ready(tmp_path):
    # A ROUTER standing in for the broker reads the worker's READY.
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    address = f"ipc://{tmp_path}/broker.sock"
    router.bind(address)
    procs = [start_worker(address, env={"RUNNABLE_K8S_CHECKPOINTER": "tests.support.checkpointer_factories:in_memory"}),
             start_worker(address)]
    try:
        said = {}
        while len(said) < len(procs):
            assert router.poll(60_000), "no READY within 60s"
            frames = router.recv_multipart()
            if frames[2] == P.READY:
                environment = json.loads(frames[3])
                said[environment["pid"]] = environment.get("checkpointer")
    finally:
        for proc in procs:
            stop_process(proc)
        router.close()
        context.term()
    assert said == {procs[0].pid: "shared", procs[1].pid: None}
