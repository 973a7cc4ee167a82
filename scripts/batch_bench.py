"""Batching across callers: calls/s, p50, requests per call and CPU per call, with and without it.

    .venv/bin/python scripts/batch_bench.py                          # 64 and 256 callers, windows 2 and 10 ms
    .venv/bin/python scripts/batch_bench.py --callers 64 --windows 5 --calls 2000 --threads

An embeddings-like runnable (``pool.bench.coalesce.PerRequest``: 20 ms per request whatever its
size, natively batched) behind a default ``LocalPool``; C callers each call ``ainvoke`` (``--threads``:
``invoke`` from C threads) in a loop. Per number of callers, in one run: the in-process reference
(the same runnable and callers in this process: every call its own request), the pool without
batching, and the pool with each ``batch_window_ms`` of ``--windows``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool import LocalPool
from pool.bench.coalesce import measure, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", default="64,256", help="comma-separated numbers of concurrent callers")
    parser.add_argument("--windows", default="2,10", help="comma-separated batch_window_ms values to run")
    parser.add_argument("--calls", type=int, default=4000, help="calls per run (after a warm-up)")
    parser.add_argument("--request-ms", type=float, default=20.0, help="what one request costs, whatever its size")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", action="store_true", help="callers are threads calling invoke")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process reference rows")
    args = parser.parse_args()
    windows = [float(w) for w in args.windows.split(",") if w]
    how = "threads calling invoke" if args.threads else "coroutines calling ainvoke"
    print(f"machine: {os.cpu_count()} CPUs; {args.calls} calls per run by {how}; {args.request_ms:g} ms per "
          f"request whatever its size; max_batch={args.max_batch}", flush=True)
    rows = []
    with LocalPool() as pool:
        for callers in (int(c) for c in args.callers.split(",")):
            runs: list[tuple[str, object, float | None]] = [] if args.no_in_process else [("in-process", None, None)]
            runs.append(("pool, no batching", pool, None))
            runs += [(f"pool, window {w:g} ms", pool, w) for w in windows]
            for label, target, window in runs:
                row = measure(label, target, callers, args.calls, window, args.request_ms, args.max_batch,
                              args.threads)
                rows.append(row)
                print(table([row])[-1], flush=True)
    print()
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
