"""The broker core's own CPU per call, with no socket, process or clock: SUBMIT in, TASK out,
RESULT in, RESULT out, through ``BrokerCore.handle`` in this process.

    .venv/bin/python scripts/broker_core_cost.py                  # 100,000 calls, 100 in flight
    .venv/bin/python scripts/broker_core_cost.py --threads 1000   # each call of one of 1,000 threads

``scripts/broker_cpu.py`` measures a whole broker process (ZeroMQ, decoding, the outbox), whose
figure swings by a tenth or more from run to run on a shared machine. The rules alone are a
small part of it, and steadier measured alone: a change to them (a new check on every task's
way) shows here or nowhere. ``--threads N`` gives each call a thread (``affinity``) among N, so
each call is routed to its thread's worker. Run it from the tree whose core you want to measure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(os.getcwd())))

from pool.broker import events as E
from pool.broker.core import BrokerCore
from worker import protocol as P
from worker.codec import digest

ENV = {"protocol": P.PROTOCOL_VERSION, "python": "3.11", "langchain_core": "1", "cloudpickle": "3", "host": "bench"}
RUNNABLE = b"a runnable's bytes"
WORKERS = 2


def measure(calls: int, in_flight: int, threads: int) -> float:
    """CPU seconds per call of ``calls`` invoke tasks, ``in_flight`` at a time on two workers."""
    core = BrokerCore(now=0.0)
    core.handle(E.Hello(b"client", ENV, fd=1), 0.0)
    for n in range(WORKERS):
        core.handle(E.Ready(b"w%d" % n, {**ENV, "concurrency": in_flight}, fd=10 + n), 0.0)
    headers = [P.TaskHeader("invoke", digest(RUNNABLE), affinity=f"thread-{n}" if threads else None).to_bytes()
               for n in range(max(1, threads))]
    core.handle(E.Submit(b"client", os.urandom(P.TASK_ID_BYTES), headers[0], RUNNABLE, b"input", fd=1), 0.0)
    fds = {b"w%d" % n: 10 + n for n in range(WORKERS)}
    ids = [os.urandom(P.TASK_ID_BYTES) for _ in range(calls)]
    running: deque[tuple[bytes, bytes]] = deque()
    started = time.process_time()
    for i, task_id in enumerate(ids):
        for effect in core.handle(E.Submit(b"client", task_id, headers[i % len(headers)], b"", b"input", fd=1), 0.0):
            if isinstance(effect, E.Send) and effect.frames[1] == P.TASK:
                running.append((effect.peer, effect.frames[2]))
        while len(running) >= in_flight:
            worker, done = running.popleft()
            for effect in core.handle(E.Result(worker, done, b"output", fd=fds[worker]), 0.0):
                if isinstance(effect, E.Send) and effect.frames[1] == P.TASK:
                    running.append((effect.peer, effect.frames[2]))
    while running:
        worker, done = running.popleft()
        for effect in core.handle(E.Result(worker, done, b"output", fd=fds[worker]), 0.0):
            if isinstance(effect, E.Send) and effect.frames[1] == P.TASK:
                running.append((effect.peer, effect.frames[2]))
    used = time.process_time() - started
    if core.counters["done"] != calls:  # (the first task, which carried the runnable, is never answered)
        raise SystemExit(f"only {core.counters['done']} of {calls} calls finished: the measure is wrong")
    return used / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="give each call one of N threads (default: none)")
    parser.add_argument("--runs", type=int, default=5, help="the best of this many runs is printed (default 5)")
    args = parser.parse_args()
    best = min(measure(args.calls, args.in_flight, args.threads) for _ in range(args.runs))
    print(f"broker core {best * 1e6:.2f} us/call (best of {args.runs} runs of {args.calls:,} calls, "
          f"{args.in_flight} in flight, {args.threads or 'no'} threads)")


if __name__ == "__main__":
    main()
