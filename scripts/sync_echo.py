"""A lone sync caller: ``invoke`` of an echo runnable one call after the other, p50 latency and
this process's CPU per call, against in-process LangChain.

    .venv/bin/python scripts/sync_echo.py --calls 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s


def echo(x: object) -> object:
    return x


def run(runnable: RunnableLambda | RunnableK8s, calls: int) -> tuple[float, float]:
    """p50 latency (us) and CPU per call (us) of ``calls`` sequential invokes."""
    latencies = []
    cpu = time.process_time()
    for i in range(calls):
        begun = time.perf_counter()
        runnable.invoke(i)
        latencies.append(time.perf_counter() - begun)
    return statistics.median(latencies) * 1e6, (time.process_time() - cpu) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with LocalPool(workers=1) as pool:
        local = RunnableLambda(echo)
        remote = RunnableK8s(bound=RunnableLambda(echo), pool=pool.address, mode="warm", timeout=30)
        run(remote, 200)
        print(f"{'':<10} {'p50 us':>8} {'cpu us':>8}")
        for _ in range(args.rounds):
            for name, runnable in (("in-proc", local), ("pool", remote)):
                p50, cpu = run(runnable, args.calls)
                print(f"{name:<10} {p50:>8.0f} {cpu:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
