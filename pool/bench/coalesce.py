"""Batching across callers, measured: calls/s, p50 and CPU per call with and without ``batch_window_ms``.

The workload is shaped like an embeddings API: :class:`PerRequest` costs the same per request
whatever its size (``request_ms``, a sleep) and batches natively (a batch, or the
``batch_as_completed`` a worker runs a batch task with, is ONE request). C callers each call
``ainvoke`` (or ``invoke`` from C threads) in a loop, one input at a time, as the users of one
application would. The same runnable and callers run in this process too (the in-process
reference: what LangChain alone gives, every call its own request).

Every request appends one byte to a file, so requests per call is read from its size, wherever the
request ran (this process or a worker).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable

from pool.bench.cpu import CpuMeter, per_call_us, pool_processes

__all__ = ["PerRequest", "Row", "measure"]


class PerRequest(RunnableSerializable[Any, Any]):
    """Sleeps ``request_ms`` per request, whatever the request holds; a batch is one request.
    Each request appends a byte to ``counter`` (a file path) when one is given."""

    request_ms: float = 20.0
    counter: str | None = None

    def _count(self) -> None:
        if self.counter:
            fd = os.open(self.counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b".")
            finally:
                os.close(fd)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        self._count()
        time.sleep(self.request_ms / 1000)
        return input

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        self._count()
        await asyncio.sleep(self.request_ms / 1000)
        return input

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        self._count()
        time.sleep(self.request_ms / 1000)
        return list(inputs)

    def batch_as_completed(self, inputs: Sequence[Any],
                           config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                           return_exceptions: bool = False, **kwargs: Any) -> Iterator[tuple[int, Any]]:
        yield from enumerate(self.batch(list(inputs)))

    async def abatch_as_completed(self, inputs: Sequence[Any],
                                  config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                                  return_exceptions: bool = False,
                                  **kwargs: Any) -> AsyncIterator[tuple[int, Any]]:
        self._count()
        await asyncio.sleep(self.request_ms / 1000)
        for index, value in enumerate(inputs):
            yield index, value


@dataclass
class Row:
    """One run: what ran where, and what it gave."""

    label: str
    callers: int
    calls: int
    calls_per_s: float
    p50_ms: float
    requests_per_call: float
    cpu_us_per_call: dict[str, float | None] = field(default_factory=dict)


async def _drive_async(target: Runnable, callers: int, calls: int, latencies: list[float]) -> None:
    left = iter(range(calls))

    async def caller() -> None:
        for n in left:  # shared: each caller takes the next input
            start = time.perf_counter()
            await target.ainvoke(n)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(caller() for _ in range(callers)))


def _drive_threads(target: Runnable, callers: int, calls: int, latencies: list[float]) -> None:
    left = iter(range(calls))
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                n = next(left, None)
            if n is None:
                return
            start = time.perf_counter()
            target.invoke(n)
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _drive(target: Runnable, callers: int, calls: int, threads: bool) -> list[float]:
    latencies: list[float] = []
    if threads:
        _drive_threads(target, callers, calls, latencies)
    else:
        asyncio.run(_drive_async(target, callers, calls, latencies))
    return latencies


def measure(label: str, pool: Any, callers: int, calls: int, window_ms: float | None, request_ms: float = 20.0,
            max_batch: int = 64, threads: bool = False) -> Row:
    """One run of ``calls`` calls by ``callers`` callers: in this process (``pool`` None), or
    through ``pool`` (a LocalPool) with ``batch_window_ms=window_ms`` (None: no batching). A
    warm-up run first, so that every process has the runnable cached."""
    from pool.client.runnable import RunnableK8s  # the bench's package imports no client until it runs

    with tempfile.TemporaryDirectory(prefix="rk8s-coalesce-") as folder:
        counter = os.path.join(folder, "requests")
        bound = PerRequest(request_ms=request_ms, counter=counter)
        target: Runnable = bound if pool is None else RunnableK8s(
            bound=bound, pool=pool.address, mode="warm", timeout=300, batch_window_ms=window_ms, max_batch=max_batch)
        _drive(target, callers, min(calls, 2 * callers), threads)
        done = os.path.getsize(counter)
        meter = CpuMeter(pool_processes(pool)).start()
        start = time.perf_counter()
        latencies = _drive(target, callers, calls, threads)
        wall = time.perf_counter() - start
        used = meter.stop()["cpu_s"]
        requests = os.path.getsize(counter) - done
    return Row(label, callers, calls, calls / wall, statistics.median(latencies) * 1000, requests / calls,
               per_call_us(used, calls))


def table(rows: list[Row]) -> list[str]:
    """The rows as text: one line each, CPU microseconds per call by process."""
    names: list[str] = []
    for row in rows:
        names += [name for name in row.cpu_us_per_call if name not in names and name != "workers"]
    order = {"client": 0, "broker": 1, "total": 9}
    names.sort(key=lambda n: (order.get(n, 5), n))
    lines = [f"{'run':<22} {'callers':>7} {'calls/s':>9} {'p50 ms':>8} {'req/call':>8}  CPU us/call: "
             + " ".join(f"{n:>9}" for n in names)]
    for row in rows:
        cells = " ".join(f"{'-':>9}" if row.cpu_us_per_call.get(n) is None else f"{row.cpu_us_per_call[n]:>9,.0f}"
                         for n in names)
        lines.append(f"{row.label:<22} {row.callers:>7} {row.calls_per_s:>9,.0f} {row.p50_ms:>8.1f} "
                     f"{row.requests_per_call:>8.3f}               {cells}")
    return lines
