"""What a call costs the process that makes it: in-process LangChain against a warm pool.

    .venv/bin/python scripts/caller_cpu.py                      # io ainvoke and 20-token astream
    .venv/bin/python scripts/caller_cpu.py --calls 5000 --in-flight 256 --workload io

For each workload the same runnable runs twice in one asyncio loop, ``in_flight`` separate calls
at once (``ainvoke`` per call for ``io``, ``astream`` of a 20-token fake chat model for ``llm``):
once in this process, once through ``RunnableK8s`` on a ``LocalPool``. The figure is this
process's CPU time (every thread: the connection's I/O thread is part of what offloading costs)
per call, and the ratio pool / in-process: below 1 the pool saves the caller CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_core.runnables import Runnable, RunnableLambda

from pool import LocalPool, RunnableK8s
from pool.bench import fake_llm


async def io_call(x: object) -> object:
    await asyncio.sleep(0.05)
    return x


async def drive(runnable: Runnable[Any, Any], calls: int, in_flight: int, streamed: bool) -> tuple[float, float]:
    """Run ``calls`` calls, ``in_flight`` at a time; the CPU seconds this process spent, and the
    wall-clock seconds."""
    inputs = iter(range(calls))

    async def caller() -> None:
        for i in inputs:  # shared iterator: each caller takes the next input
            if streamed:
                async for _ in runnable.astream(f"prompt {i}"):
                    pass
            else:
                await runnable.ainvoke(i)

    start, began = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return time.process_time() - start, time.monotonic() - began


def build(workload: str) -> Runnable[Any, Any]:
    if workload == "llm":
        return fake_llm.build(median_ms=50.0, tokens=20)
    return RunnableLambda(io_call)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="io,llm")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="alternating in-process / pool runs")
    args = parser.parse_args()
    with LocalPool(workers=2, slots=max(64, args.in_flight)) as pool:
        print(f"{'workload':<8} {'in flight':>9} {'in-proc us':>10} {'pool us':>8} {'ratio':>6} "
              f"{'in-proc/s':>9} {'pool/s':>7}")
        for workload in args.workload.split(","):
            streamed = workload == "llm"
            local = build(workload)
            remote = RunnableK8s(bound=build(workload), pool=pool.address, mode="warm", timeout=300)
            warm = min(args.calls, 2 * args.in_flight)
            asyncio.run(drive(remote, warm, args.in_flight, streamed))  # runnable cached everywhere
            asyncio.run(drive(local, warm, args.in_flight, streamed))
            for _ in range(args.rounds):
                here, here_wall = asyncio.run(drive(local, args.calls, args.in_flight, streamed))
                there, there_wall = asyncio.run(drive(remote, args.calls, args.in_flight, streamed))
                here, there = here / args.calls * 1e6, there / args.calls * 1e6
                print(f"{workload:<8} {args.in_flight:>9} {here:>10.0f} {there:>8.0f} {there / here:>6.2f} "
                      f"{args.calls / here_wall:>9.0f} {args.calls / there_wall:>7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
