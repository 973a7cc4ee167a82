"""Where a warm call's CPU goes: CPU time per call in the client, the broker and the workers.

    .venv/bin/python scripts/cpu_per_hop.py                    # echo and io, 64 and 1,024 in flight
    .venv/bin/python scripts/cpu_per_hop.py --calls 20000 --in-flight 256 --workload io
    .venv/bin/python scripts/cpu_per_hop.py --calls 2000 --in-flight 100 --workload llm   # 20 streamed tokens
    .venv/bin/python scripts/cpu_per_hop.py --workload io --in-flight 1024 --calls-as ainvoke

A default ``LocalPool`` (its broker and workers are processes of their own) runs each workload
with N calls in flight; the CPU time (user + system, from /proc/PID/stat: ``pool.bench.cpu``) each
process spent over the run, divided by the calls, is the per-hop cost. On a machine with few cores
this, not latency, is what limits throughput: calls/s <= cores / (sum of the hops' CPU per call).
Each workload's first row is its in-process reference: the same runnable, the same calls in
flight, in this process (what the caller would spend without the pool).

echo and io go as one ``abatch`` by default (``--calls-as ainvoke``: separate calls, as many users
of one application make them); llm streams separate calls (``astream``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_core.runnables import Runnable, RunnableLambda

from pool import LocalPool, RunnableK8s
from pool.bench import fake_llm
from pool.bench.cpu import CpuMeter, cpu_seconds, per_call_us, pool_processes
from pool.bench.llm import prompts

__all__ = ["cpu_seconds", "main", "measure"]  # cpu_seconds: kept importable from here


def echo(x: object) -> object:
    return x


async def io_call(x: object) -> object:
    await asyncio.sleep(0.05)
    return x


async def drive(remote: Runnable, calls: int, in_flight: int, streamed: bool = False, separate: bool = False) -> None:
    if not streamed and not separate:
        await remote.abatch(list(range(calls)), config={"max_concurrency": in_flight})
        return
    inputs = iter(prompts(calls))

    async def caller() -> None:
        for prompt in inputs:  # shared iterator: each caller takes the next prompt
            if streamed:
                async for _ in remote.astream(prompt):
                    pass
            else:
                await remote.ainvoke(prompt)

    await asyncio.gather(*(caller() for _ in range(in_flight)))


def runnable_for(workload: str) -> Runnable:
    if workload == "llm":  # 20 streamed tokens over a 50 ms reply: the per-token path, not the model's wait
        return fake_llm.build(median_ms=50.0, tokens=20)
    return RunnableLambda(echo) if workload == "echo" else RunnableLambda(io_call)


def measure(pool: LocalPool | None, workload: str, calls: int, in_flight: int,
            separate: bool = False) -> dict[str, float]:
    """CPU microseconds per call of each process (``pool=None``: the runnable in this process)."""
    streamed = workload == "llm"
    runnable = runnable_for(workload)
    target: Runnable = runnable if pool is None else RunnableK8s(bound=runnable, pool=pool.address, mode="warm",
                                                                 timeout=300)
    asyncio.run(drive(target, min(calls, 2 * in_flight), in_flight, streamed, separate))  # warm: cached everywhere
    meter = CpuMeter(pool_processes(pool)).start()
    start = time.monotonic()
    asyncio.run(drive(target, calls, in_flight, streamed, separate))
    wall = time.monotonic() - start
    used = per_call_us(meter.stop()["cpu_s"], calls)
    row = {name: value for name, value in used.items() if value is not None and name not in ("workers", "total")}
    row["calls/s"] = calls / wall
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="echo,io")
    parser.add_argument("--in-flight", default="64,1024")
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--calls-as", choices=("abatch", "ainvoke"), default="abatch",
                        help="echo and io: one abatch (default) or separate ainvoke calls")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process reference rows")
    args = parser.parse_args()
    separate = args.calls_as == "ainvoke"
    print(f"machine: {os.cpu_count()} CPUs; CPU microseconds per call by process (user + system)")
    with LocalPool() as pool:
        header = ["client", "broker"] + [f"worker-{i}" for i in range(1, len(pool.pids))]
        print(f"{'workload':<8} {'runs as':<10} {'in flight':>9} " + " ".join(f"{n:>9}" for n in header)
              + f" {'total':>9} {'calls/s':>9}")
        for workload in args.workload.split(","):
            for in_flight in (int(n) for n in args.in_flight.split(",")):
                for label, target in ((("in-process", None),) if not args.no_in_process else ()) + (("warm", pool),):
                    row = measure(target, workload, args.calls, in_flight, separate)
                    total = sum(value for name, value in row.items() if name != "calls/s")
                    cells = " ".join(f"{row[n]:>9.0f}" if n in row else f"{'-':>9}" for n in header)
                    print(f"{workload:<8} {label:<10} {in_flight:>9} {cells} {total:>9.0f} {row['calls/s']:>9.0f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
