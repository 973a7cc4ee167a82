"""Measuring helpers of ``runnable-k8s bench`` (``pool.bench.command``): percentiles, timed calls,
the machine's description, and the bare pyzmq floor (``pool.bench.floor``) that every figure is
read against. The machine's CPU and memory come from ``pool.bench.machine`` (kept importable from
here as ``cpu_model`` and ``memory_gb``), which also answers where there is no ``/proc``."""

from __future__ import annotations

import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import zmq

from pool.bench.machine import cpu_model as cpu_model  # re-exported: the bench imports them from here
from pool.bench.machine import memory_gb as memory_gb
from pool.bench.workloads import echo
from pool.local import _read_line, _stop_all


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": round(pick(0.50), 4), "p95_ms": round(pick(0.95), 4), "p99_ms": round(pick(0.99), 4),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 4), "calls": len(ordered)}


def timed_samples(call: Callable[[], Any], calls: int, warmup: int = 50,
                  tick: Callable[[str], None] | None = None) -> list[float]:
    """Seconds each of ``calls`` sequential calls took, after ``warmup`` untimed ones; ``tick``
    hears about progress every 50 calls (every call when there are few)."""
    for _ in range(warmup):
        call()
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
        if tick is not None and (calls <= 50 or i % 50 == 0):
            tick(f"call {i + 1}/{calls}")
    return samples


def time_calls(call: Callable[[], Any], calls: int, warmup: int = 50) -> dict[str, float]:
    return percentiles(timed_samples(call, calls, warmup))


# ---------------------------------------------------------------------- the bare floor

class BareFloor:
    """The bare broker and two bare workers as processes, and a DEALER client.

    Its sockets are ipc:// in a fresh folder only this user may enter (the floor's worker runs any
    pickle it is sent); the floor's broker removes the folder when it stops or this process dies,
    and :meth:`close` removes it too."""

    def __init__(self, workers: int, slots: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.folder = tempfile.mkdtemp(prefix="rk8s-floor-")  # mode 0700
        try:
            broker = subprocess.Popen([sys.executable, "-m", "pool.bench.floor", "broker", self.folder],
                                      stdout=subprocess.PIPE)
            self.procs.append(broker)
            ready = _read_line(broker, 20).split()
            if len(ready) != 3 or ready[0] != "READY":
                raise RuntimeError(f"the bench's bare floor broker did not start (it said {' '.join(ready)!r})")
        except BaseException:
            _stop_all(self.procs)
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        _, front, back = ready
        self.frontend, self.backend = front, back
        for _ in range(workers):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "pool.bench.floor", "worker", back, str(slots)]))
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = 60_000  # a lost reply fails the bench instead of hanging it
        self.sock.connect(front)
        # Plain pickle: the function by reference, as a worker that has it imported would see it
        # (cloudpickle would carry it by value: its module is registered for that).
        self.payload = pickle.dumps((echo, 1))
        time.sleep(0.5)  # let the workers register
        self.counter = 0

    def call(self) -> None:
        self.counter += 1
        self.sock.send_multipart([self.counter.to_bytes(8, "big"), self.payload])
        self.sock.recv_multipart()

    def throughput(self, tasks: int, in_flight: int) -> float:
        started = time.perf_counter()
        sent = received = 0
        while received < tasks:
            while sent < tasks and sent - received < in_flight:
                sent += 1
                self.sock.send_multipart([sent.to_bytes(8, "big"), self.payload])
            self.sock.recv_multipart()
            received += 1
        return tasks / (time.perf_counter() - started)

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()
        _stop_all(self.procs)
        shutil.rmtree(self.folder, ignore_errors=True)


def environment() -> dict[str, Any]:
    import langchain_core
    import zmq as pyzmq

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pyzmq": pyzmq.__version__,
        "libzmq": pyzmq.zmq_version(),
        "langchain_core": langchain_core.__version__,
        "cloudpickle": cloudpickle.__version__,
    }
