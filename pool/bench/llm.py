"""The ``llm`` workload's run: many streamed chat-model calls in flight, against an in-process reference.

``N`` asyncio callers (``--concurrency``'s highest value, 1,000 by default for this workload) each
stream calls back to back (``astream``) until ``--llm-calls`` calls are done; every call gets its
own prompt (``"bench prompt {i}"``), so the fake model (:mod:`pool.bench.fake_llm`) draws a
different latency for each one, and the same prompts (hence the same latencies) in both runs:

* **in-process**: the model itself, in this process's one asyncio loop: the reference;
* **warm**: ``RunnableK8s(bound=model, pool=...)``, every call through the broker to a worker.

The reference is one process: LangChain's chat-model streaming path costs about 1-2 ms of CPU per
20-token call on a 2-vCPU machine (``process_cpu_ms_per_call``), so at 1,000 calls in flight with
a 500 ms median the in-process loop is CPU-bound (it would need ~2,000 calls/s), and its latencies
include waiting for its own CPU. The pool spreads the model's work over worker processes.

For each: calls/s (calls over the wall time from the first start to the last end), end-to-end
latency of each call (its start to its last chunk) and time to first token (its start to its
first chunk), as p50/p95/p99; and the ratios warm/in-process.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from langchain_core.runnables import Runnable

from pool.bench.cpu import CpuMeter, cpu_table, per_call_us, utilisation
from pool.bench.measure import percentiles


def prompts(count: int, offset: int = 0) -> list[str]:
    return [f"bench prompt {i}" for i in range(offset, offset + count)]


async def _run(runnable: Runnable, inputs: list[str], in_flight: int,
               tick: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stream every input with ``in_flight`` callers; per-call latencies and the wall time."""
    totals: list[float] = []
    firsts: list[float] = []
    errors: list[str] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < len(inputs):
            value = inputs[next_index]
            next_index += 1
            started = time.perf_counter()
            first = None
            try:
                async for _ in runnable.astream(value):
                    if first is None:
                        first = time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            total = time.perf_counter() - started
            totals.append(total)
            firsts.append(first if first is not None else total)
            if tick is not None and len(totals) % 100 == 0:
                tick(f"{len(totals)}/{len(inputs)} calls")

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(min(in_flight, len(inputs)))))
    wall = time.perf_counter() - started
    return {"totals": totals, "firsts": firsts, "errors": errors, "wall_s": wall}


def measure(runnable: Runnable, calls: int, in_flight: int, warmup: int,
            tick: Callable[[str], None] | None = None, processes: dict[str, int] | None = None) -> dict[str, Any]:
    """Warm-up calls (other prompts, not timed), then ``calls`` streamed calls, ``in_flight`` at once.

    ``processes`` (name -> pid, :func:`pool.bench.cpu.pool_processes`): the CPU per call of each,
    over the timed calls only (``cpu_us_per_call``); by default, this process's."""
    meter = CpuMeter(processes or {"client": os.getpid()})
    timed: dict[str, Any] = {}

    async def both() -> dict[str, Any]:
        if warmup:
            await _run(runnable, prompts(warmup, offset=10**9), in_flight)
        meter.start()
        run = await _run(runnable, prompts(calls), in_flight, tick)
        timed.update(meter.stop())
        return run

    cpu_started = time.process_time()
    run = asyncio.run(both())
    cpu = time.process_time() - cpu_started
    done = len(run["totals"])
    figures: dict[str, Any] = {"calls": calls, "completed": done, "errors": len(run["errors"]),
                               "in_flight": in_flight, "wall_s": round(run["wall_s"], 3),
                               "throughput_per_s": round(done / run["wall_s"], 1) if run["wall_s"] > 0 else None}
    # This process's CPU over warm-up and run, per call: in-process, what LangChain's chat-model
    # streaming path costs (it bounds the reference's own throughput); warm, the client's share.
    figures["process_cpu_ms_per_call"] = round(cpu * 1000 / max(1, done + warmup), 3)
    figures["cpu_us_per_call"] = per_call_us(timed["cpu_s"], done)
    figures["cores_busy"] = utilisation(timed["cpu_s"], timed["wall_s"])
    figures["load_1m"] = round(os.getloadavg()[0], 2)  # the machine's load at the end (shared machines)
    if run["errors"]:
        figures["first_errors"] = run["errors"][:5]
    if done:
        figures["end_to_end"] = percentiles(run["totals"])
        figures["ttft"] = percentiles(run["firsts"])
    return figures


def ratios(warm: dict[str, Any], in_process: dict[str, Any]) -> dict[str, Any]:
    """warm against in-process: throughput and p50/p99 ratios, and the time-to-first-token gap."""
    out: dict[str, Any] = {}
    if warm.get("throughput_per_s") and in_process.get("throughput_per_s"):
        out["throughput_warm_over_in_process"] = round(warm["throughput_per_s"] / in_process["throughput_per_s"], 3)
    if "end_to_end" in warm and "end_to_end" in in_process:
        for q in ("p50", "p99"):
            base = in_process["end_to_end"][f"{q}_ms"]
            out[f"{q}_warm_over_in_process"] = round(warm["end_to_end"][f"{q}_ms"] / base, 3) if base else None
    if "ttft" in warm and "ttft" in in_process:
        for q in ("p50", "p99"):
            out[f"ttft_{q}_ms_over_in_process"] = round(warm["ttft"][f"{q}_ms"] - in_process["ttft"][f"{q}_ms"], 3)
    return out


def p50_goal(in_flight: int) -> float:
    """The end-to-end p50 the pool may add, as a multiple of in-process: 1.05 x up to 100 calls in
    flight (the caller's loop is not yet busy, so anything more is the pool's own wait); 1.3 x
    beyond (the reference's one loop and the pool share the same cores)."""
    return 1.05 if in_flight <= 100 else 1.3


def goals(figures: dict[str, Any]) -> dict[str, Any]:
    """The goals for this workload: p50 end-to-end <= :func:`p50_goal` x in-process, time to first
    token <= in-process + 5 ms (p50)."""
    r = figures.get("ratios", {})
    found: dict[str, Any] = {}
    p50 = p50_goal(int(figures.get("in_flight") or 0))
    for name, key, goal, unit in (("llm_p50_over_in_process", "p50_warm_over_in_process", p50, "x"),
                                  ("llm_ttft_p50_ms_over_in_process", "ttft_p50_ms_over_in_process", 5.0, "ms")):
        measured = r.get(key)
        if measured is not None:
            found[name] = {"measured": measured, "goal": goal, "unit": unit, "compare": "<=", "met": measured <= goal}
    return found


def format_section(figures: dict[str, Any]) -> list[str]:
    """The table rows of ``results["llm"]``."""
    s = figures["settings"]
    lines = [f"llm workload: fake chat model, log-normal latency (median {s['latency_ms']:g} ms, sigma "
             f"{s['sigma']:g}), {s['tokens']} tokens streamed over it; {figures['in_flight']} in flight, "
             f"{figures['calls']} streamed calls (astream) per run, same prompts in both"]
    header = (f"  {'runs as':24} {'calls/s':>9} {'e2e p50':>9} {'e2e p95':>9} {'e2e p99':>9} "
              f"{'TTFT p50':>9} {'TTFT p95':>9} {'TTFT p99':>9} {'errors':>7}")
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    for label, key in (("in-process (one loop)", "in_process"), ("warm", "warm")):
        run = figures.get(key)
        if not run:
            continue
        e2e, ttft = run.get("end_to_end", {}), run.get("ttft", {})

        def ms(d: dict[str, Any], q: str) -> str:
            value = d.get(f"{q}_ms")
            return f"{value:>9.1f}" if value is not None else f"{'-':>9}"

        rate = run.get("throughput_per_s")
        lines.append(f"  {label:24} {rate if rate is not None else '-':>9} {ms(e2e, 'p50')} {ms(e2e, 'p95')} "
                     f"{ms(e2e, 'p99')} {ms(ttft, 'p50')} {ms(ttft, 'p95')} {ms(ttft, 'p99')} {run['errors']:>7}"
                     f"   (this process's CPU: {run.get('process_cpu_ms_per_call', '-')} ms per call)")
    cpu_rows = [(label, figures[key]["cpu_us_per_call"]) for label, key in
                (("in-process (one loop)", "in_process"), ("warm", "warm"))
                if "cpu_us_per_call" in (figures.get(key) or {})]
    if cpu_rows:
        lines.extend(cpu_table(cpu_rows))
    pool = figures.get("pool") or {}
    if pool.get("local"):
        lines.append(f"  (warm: LocalPool, {pool.get('workers')} workers x {pool.get('slots')} slots)")
    for key, value in figures.get("ratios", {}).items():
        lines.append(f"  {key.replace('_', ' '):40} {value}")
    return lines
