"""Where a warm call's CPU goes: CPU time per call in the client, the broker and the workers.

    .venv/bin/python scripts/cpu_per_hop.py                    # echo and io, 64 and 1,024 in flight
    .venv/bin/python scripts/cpu_per_hop.py --calls 20000 --in-flight 256 --workload io
    .venv/bin/python scripts/cpu_per_hop.py --calls 2000 --in-flight 100 --workload llm   # 20 streamed tokens

A default ``LocalPool`` (its broker and workers are processes of their own) runs each workload
with N calls in flight; the CPU time (user + system, from /proc/PID/stat) each process spent over
the run, divided by the calls, is the per-hop cost. On a machine with few cores this, not
latency, is what limits throughput: calls/s <= cores / (sum of the hops' CPU per call).
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
from pool.bench.llm import prompts

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def echo(x: object) -> object:
    return x


async def io_call(x: object) -> object:
    await asyncio.sleep(0.05)
    return x


async def drive(remote: RunnableK8s, calls: int, in_flight: int, streamed: bool = False) -> None:
    if not streamed:
        await remote.abatch(list(range(calls)), config={"max_concurrency": in_flight})
        return
    inputs = iter(prompts(calls))

    async def caller() -> None:
        for prompt in inputs:  # shared iterator: each caller takes the next prompt
            async for _ in remote.astream(prompt):
                pass

    await asyncio.gather(*(caller() for _ in range(in_flight)))


def measure(pool: LocalPool, workload: str, calls: int, in_flight: int) -> dict[str, float]:
    streamed = workload == "llm"
    if streamed:  # 20 streamed tokens over a 50 ms reply: the per-token path, not the model's wait
        runnable: Runnable = fake_llm.build(median_ms=50.0, tokens=20)
    else:
        runnable = RunnableLambda(echo) if workload == "echo" else RunnableLambda(io_call)
    remote = RunnableK8s(bound=runnable, pool=pool.address, mode="warm", timeout=300)
    asyncio.run(drive(remote, min(calls, 2 * in_flight), in_flight, streamed))  # warm: runnable cached everywhere
    pids = {"client": os.getpid(), "broker": pool.pids[0]}
    pids.update({f"worker-{i}": pid for i, pid in enumerate(pool.pids[1:], 1)})
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    asyncio.run(drive(remote, calls, in_flight, streamed))
    wall = time.monotonic() - start
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    row = {name: seconds / calls * 1e6 for name, seconds in used.items()}
    row["calls/s"] = calls / wall
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="echo,io")
    parser.add_argument("--in-flight", default="64,1024")
    parser.add_argument("--calls", type=int, default=10000)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; CPU microseconds per call by process (user + system)")
    with LocalPool() as pool:
        header = None
        for workload in args.workload.split(","):
            for in_flight in (int(n) for n in args.in_flight.split(",")):
                row = measure(pool, workload, args.calls, in_flight)
                if header is None:
                    header = [name for name in row if name != "calls/s"]
                    print(f"{'workload':<8} {'in flight':>9} " + " ".join(f"{n:>9}" for n in header)
                          + f" {'total':>9} {'calls/s':>9}")
                total = sum(row[name] for name in header)
                print(f"{workload:<8} {in_flight:>9} " + " ".join(f"{row[n]:>9.0f}" for n in header)
                      + f" {total:>9.0f} {row['calls/s']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
