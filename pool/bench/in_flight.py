"""Many separate calls in flight, with the CPU of every process: one figure of the bench's goals.

``in_flight`` asyncio callers each make calls back to back (``ainvoke``, or ``astream`` for a
streaming runnable) until ``calls`` calls are done. They are separate calls, as many users of one
application make them, not one ``abatch``: a batch travels as a batch and would measure
something else. Run the same way on the runnable itself (the in-process reference: LangChain's own
loop in this process) and on ``RunnableK8s(bound=runnable, pool=...)``, it gives

* calls/s (completed calls over the wall time of the timed run);
* end-to-end latency and, for streams, the time to first chunk, as percentiles;
* chunks received (a stream's tokens), so a cost can be divided by tokens;
* CPU per call of each process (:mod:`pool.bench.cpu`): for in-process, the whole cost of a call;
  for the pool, the caller's share (what offloading leaves to the caller) and the broker's and
  each worker's.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from langchain_core.runnables import Runnable

from pool.bench.cpu import CpuMeter, per_call_us, utilisation
from pool.bench.measure import percentiles


async def _drive(runnable: Runnable, inputs: list[Any], in_flight: int, streamed: bool) -> dict[str, Any]:
    totals: list[float] = []
    firsts: list[float] = []
    errors: list[str] = []
    chunks = 0
    pending = iter(inputs)  # shared: each caller takes the next input

    async def caller() -> None:
        nonlocal chunks
        for value in pending:
            started = time.perf_counter()
            first = None
            try:
                if streamed:
                    async for _ in runnable.astream(value):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - started
                else:
                    await runnable.ainvoke(value)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            total = time.perf_counter() - started
            totals.append(total)
            if streamed:
                firsts.append(first if first is not None else total)

    await asyncio.gather(*(caller() for _ in range(min(in_flight, len(inputs)))))
    return {"totals": totals, "firsts": firsts, "errors": errors, "chunks": chunks}


def _summary(parts: list[dict[str, Any]], calls: int, in_flight: int, streamed: bool) -> dict[str, Any]:
    """The figures of one side from its timed parts (samples pooled; wall time and CPU added up)."""
    totals = [t for part in parts for t in part["totals"]]
    firsts = [t for part in parts for t in part["firsts"]]
    errors = [e for part in parts for e in part["errors"]]
    chunks = sum(part["chunks"] for part in parts)
    wall = sum(part["wall_s"] for part in parts)
    cpu_s: dict[str, float | None] = {}
    for name in parts[0]["cpu_s"]:
        used = [part["cpu_s"].get(name) for part in parts]
        cpu_s[name] = None if any(u is None for u in used) else round(sum(u for u in used if u is not None), 4)
    done = len(totals)
    figures: dict[str, Any] = {
        "calls": calls, "completed": done, "errors": len(errors), "in_flight": in_flight,
        "call": "astream" if streamed else "ainvoke", "wall_s": round(wall, 4),
        "throughput_per_s": round(done / wall, 1) if wall > 0 else None,
        "cpu_us_per_call": per_call_us(cpu_s, done),
        "cores_busy": utilisation(cpu_s, wall),
        # the machine's 1-minute load at the end: on a shared machine, whether both sides of a ratio ran alike
        "load_1m": round(os.getloadavg()[0], 2),
    }
    if errors:
        figures["first_errors"] = errors[:5]
    if done:
        figures["end_to_end"] = percentiles(totals)
    if streamed:
        figures["chunks"] = chunks
        figures["chunks_per_call"] = round(chunks / max(1, done), 2)
        if firsts:
            figures["ttft"] = percentiles(firsts)
    return figures


async def _timed(runnable: Runnable, values: list[Any], in_flight: int, streamed: bool,
                 processes: dict[str, int]) -> dict[str, Any]:
    meter = CpuMeter(processes).start()
    run = await _drive(runnable, values, in_flight, streamed)
    return {**run, **meter.stop()}


def measure(runnable: Runnable, inputs: Callable[[int, int], list[Any]], in_flight: int, calls: int,
            streamed: bool, processes: dict[str, int], warmup: int | None = None) -> dict[str, Any]:
    """Warm-up calls (``inputs(warmup, offset)``, not timed: the runnable reaches every worker and
    connections open), then ``calls`` timed calls ``in_flight`` at once, the CPU of ``processes``
    (name -> pid) measured over exactly the timed run."""
    warm = in_flight if warmup is None else warmup

    async def run() -> dict[str, Any]:
        if warm:
            await _drive(runnable, inputs(warm, 10**9), in_flight, streamed)
        return await _timed(runnable, inputs(calls, 0), in_flight, streamed, processes)

    return _summary([asyncio.run(run())], calls, in_flight, streamed)


def compare(reference: Runnable, remote: Runnable, inputs: Callable[[int, int], list[Any]], in_flight: int,
            calls: int, streamed: bool, processes: dict[str, int], warmup: int | None = None) -> dict[str, Any]:
    """The reference (in this process) and the pool, ``calls`` calls each, timed in the order
    A B B A, half the calls per part: a machine whose load drifts during the run (a shared one)
    weighs on both sides alike, where A then B would hand all of a drift to one side. Both sides
    get the same inputs (the first half, then the second)."""
    warm = in_flight if warmup is None else warmup
    half = max(1, calls // 2)
    me = {"client": os.getpid()}

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        for side in (reference, remote):
            if warm:
                await _drive(side, inputs(warm, 10**9), in_flight, streamed)
        first, second = inputs(half, 0), inputs(calls - half, half)
        a1 = await _timed(reference, first, in_flight, streamed, me)
        b1 = await _timed(remote, first, in_flight, streamed, processes)
        b2 = await _timed(remote, second, in_flight, streamed, processes)
        a2 = await _timed(reference, second, in_flight, streamed, me)
        return [a1, a2], [b1, b2]

    a, b = asyncio.run(run())
    return {"order": "ABBA", "in_process": _summary(a, calls, in_flight, streamed),
            "warm": _summary(b, calls, in_flight, streamed)}


def same_value(value: Any) -> Callable[[int, int], list[Any]]:
    """Inputs for a runnable whose input does not matter: ``value`` every time."""
    return lambda count, offset: [value] * count


def sustained(runnable: Runnable, inputs: Callable[[int, int], list[Any]], in_flight: int, seconds: float,
              streamed: bool, processes: dict[str, int], warmup: int | None = None) -> dict[str, Any]:
    """``in_flight`` callers kept busy for ``seconds`` after a warm-up: chunks (or calls) per second
    and each process's cores busy over exactly that window, so neither the ramp-up nor the tail of
    the last calls dilutes a rate (calls still running at the end finish, uncounted)."""
    warm = in_flight if warmup is None else warmup
    window: dict[str, Any] = {}

    async def timed() -> None:
        if warm:
            await _drive(runnable, inputs(warm, 10**9), in_flight, streamed)
        counted = {"chunks": 0, "calls": 0}
        stop = asyncio.Event()

        async def caller(index: int) -> None:
            offset = index * 10**6
            while not stop.is_set():
                value = inputs(1, offset)[0]
                offset += 1
                if streamed:
                    async for _ in runnable.astream(value):
                        if not stop.is_set():
                            counted["chunks"] += 1
                else:
                    await runnable.ainvoke(value)
                if not stop.is_set():
                    counted["calls"] += 1

        meter = CpuMeter(processes).start()
        tasks = [asyncio.ensure_future(caller(i)) for i in range(in_flight)]
        await asyncio.sleep(seconds)
        stop.set()
        window.update(meter.stop(), **counted)
        await asyncio.gather(*tasks)

    asyncio.run(timed())
    wall = window["wall_s"]
    return {"in_flight": in_flight, "seconds": wall, "call": "astream" if streamed else "ainvoke",
            "calls_completed": window["calls"], "chunks": window["chunks"],
            "chunks_per_s": round(window["chunks"] / wall) if wall > 0 else None,
            "calls_per_s": round(window["calls"] / wall, 1) if wall > 0 else None,
            "cores_busy": utilisation(window["cpu_s"], wall)}
