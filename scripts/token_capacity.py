"""What a relayed token costs the broker, and how many concurrent streams a broker core carries.

    .venv/bin/python scripts/token_capacity.py                       # cost, then 1,000 streams at 50 tokens/s
    .venv/bin/python scripts/token_capacity.py --streams 2000 --rate 50 --tokens 50
    .venv/bin/python scripts/token_capacity.py --no-capacity         # the cost figures only (~15 s)

On a default ``LocalPool``, with the bench's fake streaming chat model (``pool.bench.tokens``):

1. the broker's CPU per streamed call divided by its tokens, at 20 and at 200 tokens per call
   (``--cost-streams`` calls in flight, tokens ``--gap-ms`` apart);
2. the marginal cost, the slope between those two runs (the call's fixed cost cancelled out), and
   what it implies: tokens/s per broker core (1 / cost) and concurrent streams at ``--rate``;
3. a run with ``--streams`` streams kept in flight for ``--seconds``, each ``--tokens`` tokens at
   ``--rate`` tokens/s: the tokens/s actually relayed and how many cores the broker (and every other
   process) kept busy over that window.

CPU comes from /proc/PID/stat (``pool.bench.cpu``). ``runnable-k8s bench --ratios`` runs the same
measurements among the other goals; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_core.runnables import Runnable

from pool import LocalPool, RunnableK8s
from pool.bench import tokens
from pool.bench.cpu import pool_processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost-streams", type=int, default=64, help="calls in flight in the cost runs (64)")
    parser.add_argument("--cost-calls", type=int, default=1024,
                        help="calls of the 20-token cost run; the 200-token run makes a quarter as many (1024)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="gap between tokens in the cost runs (5)")
    parser.add_argument("--streams", type=int, default=1000, help="streams in flight in the capacity run (1000)")
    parser.add_argument("--rate", type=float, default=tokens.STREAM_RATE, help="tokens/s of one stream (50)")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per call in the capacity run (50)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the capacity run's window (5)")
    parser.add_argument("--no-capacity", action="store_true", help="only the cost figures")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs", flush=True)
    with LocalPool() as pool:
        processes = pool_processes(pool)

        def remote(runnable: Runnable) -> Runnable:
            return RunnableK8s(bound=runnable, pool=pool.address, mode="warm", timeout=600)

        costs = tokens.cost_run(remote, processes, gap_ms=args.gap_ms, streams=args.cost_streams,
                                calls=args.cost_calls)
        capacity = None
        if not args.no_capacity:
            capacity = tokens.capacity_run(remote(tokens.capacity_runnable(args.tokens, args.rate)), processes,
                                           streams=args.streams, tokens=args.tokens, stream_rate=args.rate,
                                           seconds=args.seconds)
    print("\n".join(tokens.format_lines(costs, capacity)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"costs": costs, "capacity": capacity}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
