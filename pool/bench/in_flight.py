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


def measure(runnable: Runnable, inputs: Callable[[int, int], list[Any]], in_flight: int, calls: int,
            streamed: bool, processes: dict[str, int], warmup: int | None = None) -> dict[str, Any]:
    """Warm-up calls (``inputs(warmup, offset)``, not timed: the runnable reaches every worker and
    connections open), then ``calls`` timed calls ``in_flight`` at once, the CPU of ``processes``
    (name -> pid) measured over exactly the timed run."""
    warm = in_flight if warmup is None else warmup

    async def timed() -> tuple[dict[str, Any], dict[str, Any]]:
        if warm:
            await _drive(runnable, inputs(warm, 10**9), in_flight, streamed)
        meter = CpuMeter(processes).start()
        run = await _drive(runnable, inputs(calls, 0), in_flight, streamed)
        return run, meter.stop()

    run, cpu = asyncio.run(timed())
    done = len(run["totals"])
    figures: dict[str, Any] = {
        "calls": calls, "completed": done, "errors": len(run["errors"]), "in_flight": in_flight,
        "call": "astream" if streamed else "ainvoke", "wall_s": cpu["wall_s"],
        "throughput_per_s": round(done / cpu["wall_s"], 1) if cpu["wall_s"] > 0 else None,
        "cpu_us_per_call": per_call_us(cpu["cpu_s"], done),
        "cores_busy": utilisation(cpu["cpu_s"], cpu["wall_s"]),
        # the machine's 1-minute load at the end: on a shared machine, whether both sides of a ratio ran alike
        "load_1m": round(os.getloadavg()[0], 2),
    }
    if run["errors"]:
        figures["first_errors"] = run["errors"][:5]
    if done:
        figures["end_to_end"] = percentiles(run["totals"])
    if streamed:
        figures["chunks"] = run["chunks"]
        figures["chunks_per_call"] = round(run["chunks"] / max(1, done), 2)
        if run["firsts"]:
            figures["ttft"] = percentiles(run["firsts"])
    return figures


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
