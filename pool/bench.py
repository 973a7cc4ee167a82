"""``runnable-k8s bench``: what a warm call costs, measured against its floors in one run.

Figures (all on this machine, in this run):

* in-process  ``RunnableLambda.invoke`` of the same echo function (LangChain's own overhead);
* floor       a bare pyzmq DEALER -> broker -> DEALER round trip (``pool.bench_floor``);
* warm        ``RunnableK8s.invoke`` through ``LocalPool(workers=2)``;
* throughput  tasks/s with ``--in-flight`` calls outstanding, for the floor and the pool;
* big runnable  a repeated call with a 1 MB runnable against one with a 1 KB runnable (the
  runnable is sent and deserialized once, so the two should cost the same).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import zmq
from langchain_core.runnables import RunnableLambda

from pool.local import LocalPool, _read_line, _stop_all
from pool.runnable import RunnableK8s


def echo(value: Any) -> Any:
    return value


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": round(pick(0.50), 4), "p95_ms": round(pick(0.95), 4), "p99_ms": round(pick(0.99), 4),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 4), "calls": len(ordered)}


def time_calls(call: Callable[[], Any], calls: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


# ---------------------------------------------------------------------- the bare floor

class BareFloor:
    """The bare broker and two bare workers as processes, and a DEALER client."""

    def __init__(self, workers: int, slots: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        broker = subprocess.Popen([sys.executable, "-m", "pool.bench_floor", "broker", "tcp://127.0.0.1:*"],
                                  stdout=subprocess.PIPE)
        self.procs.append(broker)
        _, front, back = _read_line(broker, 20).split()
        for _ in range(workers):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "pool.bench_floor", "worker", back, str(slots)]))
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(front)
        self.payload = cloudpickle.dumps((echo, 1))
        time.sleep(0.5)  # let the workers register
        self.counter = 0

    def call(self) -> None:
        self.counter += 1
        self.sock.send_multipart([self.counter.to_bytes(8, "big"), self.payload])
        self.sock.recv_multipart()

    def throughput(self, tasks: int, in_flight: int) -> float:
        started = time.perf_counter()
        sent = received = 0
        while received < tasks:
            while sent < tasks and sent - received < in_flight:
                sent += 1
                self.sock.send_multipart([sent.to_bytes(8, "big"), self.payload])
            self.sock.recv_multipart()
            received += 1
        return tasks / (time.perf_counter() - started)

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()
        _stop_all(self.procs)


# ---------------------------------------------------------------------- the real pool

async def _pool_throughput(runnable: RunnableK8s, tasks: int, in_flight: int) -> float:
    """Many independent ainvoke calls, at most ``in_flight`` at once, like a busy async server."""
    limiter = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with limiter:
            await runnable.ainvoke(i)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(tasks)))
    return tasks / (time.perf_counter() - started)


def environment() -> dict[str, Any]:
    import langchain_core
    import zmq as pyzmq

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pyzmq": pyzmq.__version__,
        "libzmq": pyzmq.zmq_version(),
        "langchain_core": langchain_core.__version__,
        "cloudpickle": cloudpickle.__version__,
    }


def run_bench(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {"environment": environment()}
    _progress(f"in-process RunnableLambda.invoke x{args.calls}")
    local = RunnableLambda(echo)
    results["in_process"] = time_calls(lambda: local.invoke(1), args.calls)

    _progress(f"bare pyzmq floor: {args.workers} workers, latency x{args.calls}, throughput {args.throughput_tasks} tasks")
    floor = BareFloor(args.workers, slots=16)
    try:
        results["floor"] = time_calls(floor.call, args.calls)
        results["floor"]["throughput_per_s"] = round(floor.throughput(args.throughput_tasks, args.in_flight))
    finally:
        floor.close()

    _progress(f"warm RunnableK8s through LocalPool(workers={args.workers})")
    with LocalPool(workers=args.workers, concurrency=16) as pool:
        warm = RunnableK8s(bound=RunnableLambda(echo), pool=pool.address)
        results["warm"] = time_calls(lambda: warm.invoke(1), args.calls)
        _progress(f"warm throughput: {args.throughput_tasks} tasks, {args.in_flight} in flight")
        results["warm"]["throughput_per_s"] = round(asyncio.run(
            _pool_throughput(warm, args.throughput_tasks, args.in_flight)))

        _progress("repeated calls with a 1 KB and a 1 MB runnable")
        small_blob = os.urandom(1024)
        big_blob = os.urandom(1024 * 1024)
        small = RunnableK8s(bound=RunnableLambda(lambda x: len(small_blob) and x), pool=pool.address)
        big = RunnableK8s(bound=RunnableLambda(lambda x: len(big_blob) and x), pool=pool.address)
        results["runnable_1kb"] = time_calls(lambda: small.invoke(1), args.calls // 2)
        results["runnable_1mb"] = time_calls(lambda: big.invoke(1), args.calls // 2)

    floor_plus_local = results["floor"]["p50_ms"] + results["in_process"]["p50_ms"]
    results["ratios"] = {
        "warm_p50_over_floor_plus_in_process": round(results["warm"]["p50_ms"] / floor_plus_local, 3),
        "runnable_1mb_over_1kb_p50": round(results["runnable_1mb"]["p50_ms"] / results["runnable_1kb"]["p50_ms"], 3),
        "warm_throughput_over_floor": round(results["warm"]["throughput_per_s"] / results["floor"]["throughput_per_s"], 3),
    }
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        _progress(f"wrote {args.json}")
    return 0


def format_table(results: dict[str, Any]) -> str:
    rows = [f"{'':34} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'tasks/s':>9}"]
    labels = {
        "in_process": "in-process RunnableLambda.invoke",
        "floor": "bare pyzmq brokered round trip",
        "warm": "warm RunnableK8s.invoke",
        "runnable_1kb": "warm, 1 KB runnable",
        "runnable_1mb": "warm, 1 MB runnable",
    }
    for key, label in labels.items():
        r = results[key]
        throughput = r.get("throughput_per_s")
        rows.append(f"{label:34} {r['p50_ms']:8.3f} {r['p95_ms']:8.3f} {r['p99_ms']:8.3f} "
                    f"{throughput if throughput is not None else '':>9}")
    ratios = results["ratios"]
    rows.append("")
    rows.append(f"warm p50 / (floor p50 + in-process p50) = {ratios['warm_p50_over_floor_plus_in_process']}")
    rows.append(f"1 MB runnable p50 / 1 KB runnable p50    = {ratios['runnable_1mb_over_1kb_p50']}")
    rows.append(f"warm throughput / floor throughput      = {ratios['warm_throughput_over_floor']}")
    return "\n".join(rows)
