"""The floor for this design: a bare pyzmq DEALER -> ROUTER broker -> DEALER worker round trip.

No protocol, no heartbeats, no LangChain: a broker that forwards cloudpickled payloads to the
least-recently-ready worker and a worker that unpickles, calls a function and pickles the result.
``runnable-k8s bench`` runs it in the same session as the real pool so every figure can be read
as a ratio of this one.

    python -m pool.bench.floor broker FOLDER        # prints READY ipc://FOLDER/clients ipc://FOLDER/workers
    python -m pool.bench.floor worker ADDRESS SLOTS

The worker runs whatever arrives (``cloudpickle.loads``), so the floor listens only on ipc://
sockets inside FOLDER, a fresh folder only its user may enter (``tempfile.mkdtemp``, mode 0700):
another user of the machine cannot connect, where on 127.0.0.1 any of them could have run code as
the bench's user. The broker removes FOLDER when it stops, and when the bench that started it dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import cloudpickle
import zmq

CLIENTS_SOCKET = "clients"
WORKERS_SOCKET = "workers"


def private_folder(folder: str) -> Path:
    """``folder`` if it is a real folder of this user that nobody else may enter (what
    ``tempfile.mkdtemp`` makes); anything else is refused, since the sockets inside run code."""
    path = Path(folder)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{folder} must be a folder of uid {os.geteuid()} with mode 0700 "
                              f"(tempfile.mkdtemp makes one): the floor's sockets run whatever arrives")
    return path


def run_broker(path: Path) -> None:
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)  # clients
    backend = context.socket(zmq.ROUTER)  # workers
    for sock in (frontend, backend):
        sock.linger = 0
    frontend.bind(f"ipc://{path / CLIENTS_SOCKET}")
    backend.bind(f"ipc://{path / WORKERS_SOCKET}")
    print("READY", frontend.getsockopt_string(zmq.LAST_ENDPOINT), backend.getsockopt_string(zmq.LAST_ENDPOINT),
          flush=True)
    free: deque[bytes] = deque()  # one entry per free worker slot
    workers: set[bytes] = set()  # peers that said READY on the backend
    waiting: deque[list[bytes]] = deque()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    # Only this user reaches the sockets, but a stray peer of this user may still connect: anything
    # that is not a READY, a reply of a worker that said READY, or a three-frame task is dropped.
    # (When the floor was on 127.0.0.1:*, CI once saw a stray client's HELLO taken for a reply: the
    # stray became a "free slot", got a task and never answered, and the bench hung.)
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


def exit_with_parent(cleanup: list[str]) -> None:
    """Leave when the process that started this one is gone: a bench killed mid-run (a timeout,
    SIGKILL) must not leave its floor broker and workers behind, nor the broker's socket folder.
    SIGTERM (the bench's ordinary stop) removes the folder too."""
    parent = os.getppid()

    def leave(*_: Any) -> None:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        leave()

    signal.signal(signal.SIGTERM, leave)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    if sys.argv[1] == "broker":
        folder = private_folder(sys.argv[2])  # checked before anything may remove it
        exit_with_parent([str(folder)])
        run_broker(folder)
    else:
        exit_with_parent([])
        run_worker(sys.argv[2], int(sys.argv[3]))
