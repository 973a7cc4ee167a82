"""Hedged first tokens: time to first token, total time, CPU per call and hedges per call.

    .venv/bin/python scripts/hedge_bench.py                                   # 3 % of attempts stall 2 s
    .venv/bin/python scripts/hedge_bench.py --stall-rate 0.1 --hedge-after 0.2 --calls 1000 --json out.json
    .venv/bin/python scripts/hedge_bench.py --armed-cost --calls 2000     # what an armed, idle hedge costs a call

A streaming fake chat model (``pool.bench.hedge.StallingChatModel``: first token after ~50 ms,
then 19 more 5 ms apart; on ``--stall-rate`` of its attempts, drawn afresh per attempt, the first
token stalls ``--stall-s`` more) behind a ``LocalPool`` of ``--workers`` workers; ``--in-flight``
coroutines stream ``--calls`` calls. In one run: the in-process reference (the same model called
here with LangChain), the pool without hedging, and the pool with each ``--hedge-after`` (seconds,
or p95: after a warm-up of ``--warmup`` calls that gives it its samples).

``--armed-cost`` measures something else: sequential sync ``invoke`` calls of an echo with hedging
off against hedging armed at 30 s (never reached), rounds interleaved; p50 latency and the
caller's CPU per call: what the hedged path costs a call that is never hedged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool import LocalPool
from pool.bench.hedge import StallingChatModel, armed_cost, measure, table


def _setting(text: str) -> float | str:
    return text if text.startswith("p") else float(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=600, help="timed calls per run")
    parser.add_argument("--in-flight", type=int, default=16, help="calls streaming at once")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stall-rate", type=float, default=0.03, help="fraction of attempts whose first token stalls")
    parser.add_argument("--stall-s", type=float, default=2.0, help="how long a stall lasts")
    parser.add_argument("--hedge-after", default="0.2,p95", help="comma-separated seconds or p95")
    parser.add_argument("--warmup", type=int, default=64, help="untimed calls before each run")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process reference row")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--armed-cost", action="store_true", help="only measure what an armed, idle hedge costs")
    parser.add_argument("--rounds", type=int, default=4, help="--armed-cost: interleaved rounds per setting")
    args = parser.parse_args()
    if args.armed_cost:
        with LocalPool(workers=args.workers) as pool:
            figures = armed_cost(pool, args.calls, args.rounds)
        print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.calls} sequential invokes of "
              f"an echo x {args.rounds} rounds per setting (medians of the rounds)")
        for label, row in figures.items():
            print(f"hedging {label:<6} p50 {row['p50_us']:>8.1f} us   caller CPU {row['cpu_us']:>8.1f} us/call")
        return 0
    model = StallingChatModel(stall_rate=args.stall_rate, stall_s=args.stall_s)
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.calls} streamed calls, "
          f"{args.in_flight} in flight, {args.workers} workers; first token ~{model.first_ms:g} ms, "
          f"{args.stall_rate:.0%} of attempts stall {args.stall_s:g} s more; times in ms, CPU in us per call",
          flush=True)
    rows = []
    with LocalPool(workers=args.workers) as pool:
        runs: list[tuple[str, LocalPool | None, float | str | None]] = (
            [] if args.no_in_process else [("in-process", None, None)])
        runs.append(("pool, no hedging", pool, None))
        runs += [(f"pool, hedge_after={s}", pool, _setting(s)) for s in args.hedge_after.split(",") if s]
        print(table([])[0], flush=True)
        for label, target, hedge_after in runs:
            row = measure(label, target, model, args.calls, args.in_flight, hedge_after, args.warmup)
            rows.append(row)
            print(table([row])[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
