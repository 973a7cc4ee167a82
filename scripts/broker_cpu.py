"""The broker's CPU per call and per message, alone: one raw client and one raw worker drive it.

    .venv/bin/python scripts/broker_cpu.py                       # 10,000 stream calls, 100 in flight
    .venv/bin/python scripts/broker_cpu.py --calls 20000 --chunks 20 --in-flight 256

``scripts/cpu_per_hop.py`` runs a whole pool (a client, the broker, workers running a runnable),
and on a small shared machine its broker figure swings by half from run to run. Here the broker
process is the only one doing real work: this process plays the client and the worker with raw
DEALER sockets over ipc, so the broker's CPU time (from /proc, ``pool.bench.cpu``) divided by the
calls is its own cost. Each call is a stream task: SUBMIT, TASK, ``--chunks`` CHUNKs relayed one
by one, and a RESULT each way, so a call is ``4 + 2 * chunks`` messages through the broker. Run it
from the tree whose broker you want to measure (the broker is started with ``python -m pool``
from the current directory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq

from pool.bench.cpu import cpu_seconds
from worker import protocol as P


def _drive(client: zmq.Socket[Any], worker: zmq.Socket[Any], calls: int, in_flight: int, chunks: int,
           header: bytes, runnable: bytes) -> None:
    """Run ``calls`` stream tasks with at most ``in_flight`` waiting, the worker answering each."""
    poller = zmq.Poller()
    poller.register(worker, zmq.POLLIN)
    poller.register(client, zmq.POLLIN)
    sent = done = 0
    beat = time.monotonic()
    while done < calls:
        while sent < calls and sent - done < in_flight:
            client.send_multipart([P.PROTOCOL, P.SUBMIT, os.urandom(P.TASK_ID_BYTES), header,
                                   runnable if sent == 0 else b"", b"input"])
            sent += 1
        ready = dict(poller.poll(5000))
        if not ready:
            raise SystemExit("the broker answered nothing for 5 s: is it running from this tree?")
        while worker in ready:
            try:
                frames = worker.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[1] == P.TASK:
                for i in range(chunks):
                    worker.send_multipart([P.PROTOCOL, P.CHUNK, frames[2], b"token %d" % i])
                worker.send_multipart([P.PROTOCOL, P.RESULT, frames[2], b"result"])
        while client in ready:
            try:
                frames = client.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[1] == P.RESULT:
                done += 1
            elif frames[1] == P.ERROR:
                raise SystemExit(f"the broker refused a task: {frames[3:5]!r}")
        if time.monotonic() - beat > 0.5:  # both stay alive in the broker's eyes
            beat = time.monotonic()
            worker.send_multipart([P.PROTOCOL, P.HEARTBEAT])
            client.send_multipart([P.PROTOCOL, P.HEARTBEAT])


def measure(calls: int, in_flight: int, chunks: int) -> tuple[float, float]:
    """(broker CPU microseconds per call, calls per second) for ``calls`` stream tasks."""
    folder = tempfile.mkdtemp(prefix="broker-cpu-")
    address = f"ipc://{folder}/broker.sock"
    broker = subprocess.Popen([sys.executable, "-m", "pool", "broker", "--bind", address, "--announce"],
                              stdout=subprocess.PIPE, text=True)
    context: zmq.Context[Any] = zmq.Context()
    try:
        assert broker.stdout is not None
        if not broker.stdout.readline().startswith("READY"):
            raise SystemExit("the broker did not start")
        worker, client = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
        for sock in (worker, client):
            sock.linger, sock.sndhwm, sock.rcvhwm = 0, 0, 0
            sock.connect(address)
        worker.send_multipart([P.PROTOCOL, P.READY, P.encode_json(
            {**P.environment(), "pid": os.getpid(), "concurrency": in_flight})])
        client.send_multipart([P.PROTOCOL, P.HELLO, P.encode_json(P.environment())])
        for sock in (worker, client):
            if not sock.poll(10_000) or sock.recv_multipart()[1] != P.WELCOME:
                raise SystemExit("the broker did not welcome the raw client and worker")
        runnable = b"r" * 200
        header = P.TaskHeader("stream", P.content_digest(runnable), timeout=60.0,
                              config={"tags": ["bench"], "metadata": {"user": "x"}}).to_bytes()
        _drive(client, worker, min(calls, 500), in_flight, chunks, header, runnable)  # warm
        before, started = cpu_seconds(broker.pid), time.monotonic()
        _drive(client, worker, calls, in_flight, chunks, header, runnable)
        after, wall = cpu_seconds(broker.pid), time.monotonic() - started
        if before is None or after is None:
            raise SystemExit("cannot read the broker's CPU time on this system (Linux /proc, or psutil)")
        used = after - before
        return used / calls * 1e6, calls / wall
    finally:
        broker.terminate()
        broker.wait(10)
        context.destroy(linger=0)
        Path(folder, "broker.sock").unlink(missing_ok=True)
        os.rmdir(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=4, help="CHUNK messages per call (default 4)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    messages = 4 + 2 * args.chunks
    for _ in range(args.runs):
        per_call, rate = measure(args.calls, args.in_flight, args.chunks)
        print(f"broker {per_call:.0f} us/call, {per_call / messages:.1f} us/message ({messages} a call), "
              f"{rate:.0f} calls/s")


if __name__ == "__main__":
    main()
