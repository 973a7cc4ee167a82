"""The floor for this design: a bare pyzmq DEALER -> ROUTER broker -> DEALER worker round trip.

No protocol, no heartbeats, no LangChain: a broker that forwards cloudpickled payloads to the
least-recently-ready worker and a worker that unpickles, calls a function and pickles the result.
``runnable-k8s bench`` runs it in the same session as the real pool so every figure can be read
as a ratio of this one.

    python -m pool.bench.floor broker ENDPOINT      # prints READY tcp://127.0.0.1:PORT
    python -m pool.bench.floor worker ADDRESS SLOTS
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque

import cloudpickle
import zmq


def run_broker(endpoint: str) -> None:
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)  # clients
    backend = context.socket(zmq.ROUTER)  # workers
    for sock in (frontend, backend):
        sock.linger = 0
    frontend.bind(endpoint)
    backend.bind("tcp://127.0.0.1:*")
    print("READY", frontend.getsockopt_string(zmq.LAST_ENDPOINT), backend.getsockopt_string(zmq.LAST_ENDPOINT),
          flush=True)
    free: deque[bytes] = deque()  # one entry per free worker slot
    workers: set[bytes] = set()  # peers that said READY on the backend
    waiting: deque[list[bytes]] = deque()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    # Both ports are on 127.0.0.1:*, so a stray peer (a client elsewhere still reconnecting to a
    # port this run happened to get) may connect: anything that is not a READY, a reply of a worker
    # that said READY, or a three-frame task is dropped. CI once saw a stray's HELLO taken for a
    # reply: the stray became a "free slot", got a task and never answered, and the bench hung.
    while True:
        events = dict(poller.poll())
        if backend in events:
            worker, *rest = backend.recv_multipart()
            if len(rest) == 2 and rest[0] == b"READY" and rest[1].isdigit():
                workers.add(worker)
                free.extend([worker] * int(rest[1]))
            elif worker in workers and len(rest) == 3:  # [client, task id, result]
                free.append(worker)
                frontend.send_multipart(rest)
        if frontend in events:
            task = frontend.recv_multipart()  # [client, task id, payload]
            if len(task) == 3:
                waiting.append(task)
        while waiting and free:
            backend.send_multipart([free.popleft(), *waiting.popleft()])


def run_worker(address: str, slots: int) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    sock.send_multipart([b"READY", str(slots).encode()])
    while True:
        frames = sock.recv_multipart()
        if len(frames) != 3:
            continue
        client, task_id, payload = frames
        try:
            function, value = cloudpickle.loads(payload)
            reply = cloudpickle.dumps(function(value))
        except Exception:  # noqa: BLE001 - a malformed task still gets an answer, so its slot is freed
            reply = b""
        sock.send_multipart([client, task_id, reply])


def exit_with_parent() -> None:
    """Leave when the process that started this one is gone: a bench killed mid-run (a timeout,
    SIGKILL) must not leave its floor broker and workers behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    exit_with_parent()
    if sys.argv[1] == "broker":
        run_broker(sys.argv[2])
    else:
        run_worker(sys.argv[2], int(sys.argv[3]))
