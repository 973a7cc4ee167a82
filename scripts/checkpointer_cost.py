"""What a LangGraph checkpointer costs a warm call: none, the graph's own InMemorySaver, the shared SQLite one.

    .venv/bin/python scripts/checkpointer_cost.py                 # 300 calls per run, two rounds
    .venv/bin/python scripts/checkpointer_cost.py --calls 100 --rounds 1

A one-node graph, one thread, warm calls one after another on a LocalPool of one worker (after 30
warm-up calls), and the same graph invoked in this process as the reference. The shared store is
``worker.checkpointers:sqlite`` on a file in a temporary folder, removed afterwards. Rounds
alternate the runs, so a busy machine shows as spread, not as a difference.
"""

from __future__ import annotations

import argparse
import operator
import os
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from pool import LocalPool, RunnableK8s


class Tally(TypedDict):
    count: Annotated[int, operator.add]


def _add(state: Tally) -> dict[str, int]:
    return {"count": 1}


def graph(saver: Any) -> Any:
    builder = StateGraph(Tally)
    builder.add_node("add", _add)
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    return builder.compile(checkpointer=saver)


def timed(call: Any, calls: int) -> tuple[float, float]:
    """p50 and p95 in milliseconds of ``calls`` calls after 30 warm-up ones."""
    for _ in range(30):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95)]


def in_process(calls: int) -> tuple[float, float]:
    local = graph(InMemorySaver())
    config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
    return timed(lambda: local.invoke({"count": 0}, config), calls)


def on_pool(env: dict[str, str], saver: Any, calls: int) -> tuple[float, float]:
    with LocalPool(workers=1, slots=4, env=env) as pool:
        remote = RunnableK8s(bound=graph(saver), pool=pool.address, mode="warm", timeout=30)
        config = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
        return timed(lambda: remote.invoke({"count": 0}, config), calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="rk8s-checkpointer-")
    try:
        shared = {"RUNNABLE_K8S_CHECKPOINTER": "worker.checkpointers:sqlite",
                  "RUNNABLE_K8S_CHECKPOINTER_URL": os.path.join(folder, "checkpoints.sqlite")}
        print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.calls} calls per run, one thread")
        print(f"{'run':50} {'p50 ms':>8} {'p95 ms':>8}")
        for _ in range(args.rounds):
            rows = [("in-process, InMemorySaver", in_process(args.calls)),
                    ("pool, no checkpointer", on_pool({}, None, args.calls)),
                    ("pool, the graph's own InMemorySaver", on_pool({}, InMemorySaver(), args.calls)),
                    ("pool, shared SQLite (worker.checkpointers:sqlite)", on_pool(shared, InMemorySaver(), args.calls))]
            for label, (p50, p95) in rows:
                print(f"{label:50} {p50:8.2f} {p95:8.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
