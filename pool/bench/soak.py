"""``runnable-k8s bench --soak SECONDS``: an endurance run against a LocalPool, watching for leaks.

A :class:`~pool.local.LocalPool` (``--pool-workers``, default 2; ``--slots``) and ``--soak-in-flight``
asyncio callers in this process keep calls going until at least ``--soak-calls`` calls (default
100,000) are done *and* SECONDS have passed. The callers cycle through a mix of every way a client
calls the pool, with and without errors:

====  =========================================================  =====
step  call                                                        calls
====  =========================================================  =====
0     ``ainvoke`` (100 B input)                                   1
1     ``invoke`` (from a thread: the sync path)                   1
2     ``astream`` (3 chunks)                                      1
3     ``stream`` (from a thread)                                  1
4     ``abatch`` of 10, one item raising, ``return_exceptions``   10
5     ``batch`` of 10 (from a thread)                             10
6     ``ainvoke`` that raises ``ValueError`` on the worker        1
7     ``invoke`` that raises (from a thread)                      1
8     ``ainvoke`` with a 10 KB input                              1
9     ``astream`` (3 chunks)                                      1
====  =========================================================  =====

(a batch item is a call; a batch travels to the workers in sub-batches, see
``pool.client.warm_backend``). Every result is checked against its input,
every error against the one asked for; anything else is an *unexpected* error and is reported.
Each call has a timeout (``--soak-timeout``, 120 s; 0 for none), as an application's calls
usually do: a worker keeps some state per task until its deadline, which the soak shows.

Every ``--soak-interval`` seconds (and at the start, at the end of the warm-up and at the end) a
thread samples the client (this process; the last sample is taken while the callers' asyncio loop is
still open, like the others), the broker and each worker: resident memory and open file descriptors (on Linux
``VmRSS`` of ``/proc/PID/status`` and the entries of ``/proc/PID/fd``; elsewhere psutil, ``ps`` or
``lsof`` when present, else "unknown": ``pool.bench.machine``). The warm-up is
the first ``--soak-warmup`` (10%) of the calls; growth is measured from the first sample after it to
the last sample: RSS growth in % and the fd delta per process, against the goal (RSS growth
< 5%, no fd growth). The least-squares slope of RSS over calls after the warm-up (KB per 10,000
calls) is reported too: a small leak shows there before it passes 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import threading
import time
from typing import Any

from pool.bench import workloads
from pool.bench.measure import cpu_model, environment, memory_gb
from pool.client.runnable import RunnableK8s
from pool.local import LocalPool

RSS_GROWTH_GOAL_PCT = 5.0
STEPS = ("ainvoke", "invoke", "astream", "stream", "abatch", "batch", "ainvoke_error", "invoke_error",
         "ainvoke_10kb", "astream")
CALLS_PER_STEP = {"abatch": 10, "batch": 10}
BATCH = 10


# ---------------------------------------------------------------------- process figures


def rss_kb(pid: int) -> int | None:
    """Resident KiB of ``pid``: ``/proc`` on Linux, psutil or ``ps`` elsewhere (None: unknown)."""
    from pool.bench.machine import rss_kb as measured

    return measured(pid)


def open_fds(pid: int) -> int | None:
    """Open descriptors of ``pid``: ``/proc`` on Linux, psutil or ``lsof`` elsewhere (None: unknown)."""
    from pool.bench.machine import open_fds as counted

    return counted(pid)


class Sampler:
    """RSS and fd counts of named processes, taken on demand and every ``interval`` s by a thread."""

    def __init__(self, processes: dict[str, int], interval: float, progress: dict[str, int]) -> None:
        self.processes = processes
        self.interval = interval
        self.progress = progress  # the callers' counters, read (not locked: ints) at each sample
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def sample(self, label: str = "") -> dict[str, Any]:
        procs = {name: {"pid": pid, "rss_kb": rss_kb(pid), "fds": open_fds(pid)}
                 for name, pid in self.processes.items()}
        record = {"t_s": round(time.monotonic() - self.started, 2), "calls": self.progress["calls"],
                  "label": label, "processes": procs}
        with self._lock:
            self.samples.append(record)
        return record

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> Sampler:
        self.sample("start")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take the last sample (once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.sample("end")


# ---------------------------------------------------------------------- the callers


class Mix:
    """The callers' state: counters, the inputs, and the unexpected errors seen."""

    def __init__(self, address: str, keys: str | None, warmup_calls: int, on_warm: Any,
                 timeout: float | None = 120.0) -> None:
        self.plain = RunnableK8s(bound=workloads.soak_runnable(), pool=address, mode="warm", keys=keys,
                                 timeout=timeout)
        self.streamer = RunnableK8s(bound=workloads.soak_stream_runnable(), pool=address, mode="warm", keys=keys,
                                    timeout=timeout)
        self.small = os.urandom(100)
        self.big = os.urandom(10 * 1024)
        self.counts = {"calls": 0, "operations": 0, "expected_errors": 0, "unexpected_errors": 0}
        self.by_step = dict.fromkeys(STEPS, 0)
        self.unexpected: list[str] = []
        self.warmup_calls = warmup_calls
        self.on_warm = on_warm
        self.warm = False

    def _unexpected(self, what: str) -> None:
        self.counts["unexpected_errors"] += 1
        if len(self.unexpected) < 10:
            self.unexpected.append(what[:300])

    def _check(self, step: str, got: Any, want: Any) -> None:
        if got != want:
            self._unexpected(f"{step}: wrong result {str(got)[:80]!r}")

    def _expect_error(self, step: str, exc: BaseException | None) -> None:
        if isinstance(exc, ValueError) and "soak error" in str(exc):
            self.counts["expected_errors"] += 1
        else:
            self._unexpected(f"{step}: expected the ValueError, got {type(exc).__name__}: {exc}")

    async def one(self, i: int) -> None:
        step = STEPS[i % len(STEPS)]
        value: dict[str, Any] = {"i": i, "data": self.small}
        try:
            if step == "ainvoke":
                self._check(step, await self.plain.ainvoke(value), value)
            elif step == "invoke":
                self._check(step, await asyncio.to_thread(self.plain.invoke, value), value)
            elif step == "astream":
                self._check(step, [c async for c in self.streamer.astream(value)], [value] * 3)
            elif step == "stream":
                self._check(step, await asyncio.to_thread(lambda: list(self.streamer.stream(value))), [value] * 3)
            elif step in ("abatch", "batch"):
                items = [{"i": i * BATCH + k, "data": self.small, "raise": step == "abatch" and k == 3}
                         for k in range(BATCH)]
                if step == "abatch":
                    got = await self.plain.abatch(items, return_exceptions=True)
                    self._expect_error(step, got[3] if isinstance(got[3], BaseException) else None)
                    self._check(step, got[:3] + got[4:], items[:3] + items[4:])
                else:
                    self._check(step, await asyncio.to_thread(self.plain.batch, items), items)
            elif step in ("ainvoke_error", "invoke_error"):
                value["raise"] = True
                caught: BaseException | None = None
                try:
                    if step == "ainvoke_error":
                        await self.plain.ainvoke(value)
                    else:
                        await asyncio.to_thread(self.plain.invoke, value)
                except Exception as exc:  # noqa: BLE001 - checked just below
                    caught = exc
                self._expect_error(step, caught)
            elif step == "ainvoke_10kb":
                value["data"] = self.big
                self._check(step, await self.plain.ainvoke(value), value)
        except Exception as exc:  # noqa: BLE001 - a soak reports every failure and goes on
            self._unexpected(f"{step}: {type(exc).__name__}: {exc}")
        self.by_step[step] += 1
        self.counts["operations"] += 1
        self.counts["calls"] += CALLS_PER_STEP.get(step, 1)
        if not self.warm and self.counts["calls"] >= self.warmup_calls:
            self.warm = True
            self.on_warm()


async def _drive(mix: Mix, in_flight: int, calls: int, seconds: float, sampler: Sampler) -> float:
    started = time.monotonic()
    deadline = started + seconds
    next_op = 0

    async def caller() -> None:
        nonlocal next_op
        while mix.counts["calls"] < calls or time.monotonic() < deadline:
            i = next_op
            next_op += 1
            await mix.one(i)

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    finished = time.monotonic() - started
    # The last sample while this loop (its epoll and self-pipe fds) is still open, like the others.
    sampler.stop()
    return finished


# ---------------------------------------------------------------------- figures


def _slope_kb_per_10k(points: list[tuple[int, int]]) -> float | None:
    if len(points) < 3:
        return None
    xs = [float(c) for c, _ in points]
    ys = [float(r) for _, r in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 10_000, 2)


def growth(samples: list[dict[str, Any]], warm_index: int) -> dict[str, Any]:
    """Per process: RSS and fds at the baseline (``samples[warm_index]``) and at the end, growth, verdict."""
    base, end = samples[warm_index], samples[-1]
    after = samples[warm_index:]
    per_process: dict[str, Any] = {}
    for name, first in base["processes"].items():
        last = end["processes"].get(name, {})
        rss = [s["processes"][name]["rss_kb"] for s in after if s["processes"][name]["rss_kb"] is not None]
        fds = [s["processes"][name]["fds"] for s in after if s["processes"][name]["fds"] is not None]
        figures: dict[str, Any] = {"pid": first["pid"], "rss_kb_baseline": first["rss_kb"],
                                   "rss_kb_end": last.get("rss_kb"), "rss_kb_max": max(rss) if rss else None,
                                   "fds_baseline": first["fds"], "fds_end": last.get("fds"),
                                   "fds_max": max(fds) if fds else None}
        if first["rss_kb"] and last.get("rss_kb"):
            figures["rss_growth_pct"] = round((last["rss_kb"] - first["rss_kb"]) * 100 / first["rss_kb"], 2)
        if first["fds"] is not None and last.get("fds") is not None:
            figures["fd_delta"] = last["fds"] - first["fds"]
        figures["rss_slope_kb_per_10k_calls"] = _slope_kb_per_10k(
            [(s["calls"], s["processes"][name]["rss_kb"]) for s in after if s["processes"][name]["rss_kb"]])
        growth_pct = figures.get("rss_growth_pct")
        figures["rss_ok"] = growth_pct is not None and growth_pct < RSS_GROWTH_GOAL_PCT
        figures["fds_ok"] = figures.get("fd_delta") is not None and figures["fd_delta"] <= 0
        figures["passed"] = figures["rss_ok"] and figures["fds_ok"]
        per_process[name] = figures
    return per_process


def format_report(results: dict[str, Any]) -> str:
    env, s, r = results["environment"], results["settings"], results["run"]
    lines = [
        f"runnable-k8s bench --soak: LocalPool({s['workers']} workers x {s['slots']} slots), "
        f"{s['in_flight']} callers in flight, at least {s['calls']:,} calls and {s['seconds']:g} s; "
        f"call timeout {s['call_timeout_s'] if s['call_timeout_s'] else 'none'}",
        f"machine: {env.get('cpus')} CPUs ({env.get('cpu_model')}), Python {env.get('python')}, "
        f"langchain-core {env.get('langchain_core')}, pyzmq {env.get('pyzmq')}; load at start "
        f"{env.get('load_average_at_start')}, at end {env.get('load_average_at_end')}",
        f"ran {r['duration_s']:,.1f} s: {r['calls']:,} calls in {r['operations']:,} operations "
        f"({r['calls_per_s']:,.0f} calls/s); expected errors {r['expected_errors']:,}, "
        f"unexpected errors {r['unexpected_errors']:,}",
        "operations: " + ", ".join(f"{k} {v:,}" for k, v in r["by_step"].items()),
        f"samples: {len(results['samples'])} (every {s['interval_s']:g} s); baseline after the warm-up "
        f"({r['warmup_calls']:,} calls) at {results['baseline']['t_s']:g} s / {results['baseline']['calls']:,} calls",
        "",
    ]
    header = (f"{'process':10} {'pid':>8} {'RSS base KB':>12} {'RSS end KB':>11} {'RSS max KB':>11} {'growth %':>9} "
              f"{'KB/10k calls':>13} {'fds base':>9} {'fds end':>8} {'fds max':>8} {'verdict':>8}")
    lines += [header, "-" * len(header)]
    for name, g in results["growth"].items():
        def v(key: str, width: int, g: dict[str, Any] = g) -> str:
            value = g.get(key)
            return f"{'-':>{width}}" if value is None else f"{value:>{width},}"
        lines.append(f"{name:10} {g['pid']:>8} {v('rss_kb_baseline', 12)} {v('rss_kb_end', 11)} {v('rss_kb_max', 11)} "
                     f"{v('rss_growth_pct', 9)} {v('rss_slope_kb_per_10k_calls', 13)} {v('fds_baseline', 9)} "
                     f"{v('fds_end', 8)} {v('fds_max', 8)} {'PASS' if g['passed'] else 'FAIL':>8}")
    lines.append("")
    goal = results["goal"]
    lines.append(f"goal: RSS growth < {goal['rss_growth_pct_below']:g}% and no fd growth after the "
                 f"warm-up, every process: {'MET' if goal['met'] else 'NOT MET'}")
    if r["unexpected"]:
        lines.append("unexpected errors (first ones):")
        lines.extend(f"  {text}" for text in r["unexpected"])
    return "\n".join(lines)


# ---------------------------------------------------------------------- the run


def soak(args: argparse.Namespace) -> dict[str, Any]:
    seconds, calls = max(0.0, args.soak), max(0, args.soak_calls)
    warmup_calls = int(calls * args.soak_warmup)
    warmup_seconds = seconds * args.soak_warmup
    started_at = dt.datetime.now(dt.timezone.utc)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with LocalPool(workers=args.pool_workers, slots=args.slots) as pool:
        pids = pool.pids  # the broker first, then the workers
        processes = {"client": os.getpid(), "broker": pids[0]}
        processes.update({f"worker-{n}": pid for n, pid in enumerate(pids[1:], 1)})
        sampler: Sampler | None = None
        warm_index: list[int] = []

        def on_warm() -> None:
            # Counted calls reached the warm-up; the baseline waits for the warm-up seconds too.
            if sampler is not None and time.monotonic() - sampler.started >= warmup_seconds:
                sampler.sample("baseline")
                warm_index.append(len(sampler.samples) - 1)

        mix = Mix(pool.address, pool.keys_dir, warmup_calls, on_warm, timeout=args.soak_timeout or None)
        sampler = Sampler(processes, args.soak_interval, mix.counts).start()
        try:
            duration = asyncio.run(_drive(mix, args.soak_in_flight, calls, seconds, sampler))
        finally:
            sampler.stop()
    samples = sampler.samples
    if not warm_index:  # the warm-up's seconds outlasted its calls: the first sample after both
        warm_index = [next((i for i, smp in enumerate(samples)
                            if smp["calls"] >= warmup_calls and smp["t_s"] >= warmup_seconds), len(samples) - 1)]
    per_process = growth(samples, warm_index[0])
    finished_at = dt.datetime.now(dt.timezone.utc)
    env = environment()
    env.update({"started_at": started_at.isoformat(timespec="seconds"),
                "finished_at": finished_at.isoformat(timespec="seconds"),
                "load_average_at_start": load_at_start,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "cpu_model": cpu_model(), "memory_gb": memory_gb(),
                "command": "runnable-k8s bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                            else sys.argv[1:])})
    return {
        "kind": "soak",
        "settings": {"seconds": seconds, "calls": calls, "in_flight": args.soak_in_flight,
                     "interval_s": args.soak_interval, "warmup_fraction": args.soak_warmup,
                     "call_timeout_s": args.soak_timeout or None,
                     "workers": args.pool_workers, "slots": args.slots, "mix": list(STEPS), "batch_size": BATCH},
        "environment": env,
        "run": {"duration_s": round(duration, 2), **mix.counts,
                "calls_per_s": round(mix.counts["calls"] / duration, 1) if duration > 0 else 0.0,
                "warmup_calls": warmup_calls, "by_step": mix.by_step, "unexpected": mix.unexpected},
        "baseline": {"t_s": samples[warm_index[0]]["t_s"], "calls": samples[warm_index[0]]["calls"],
                     "index": warm_index[0]},
        "growth": per_process,
        "goal": {"rss_growth_pct_below": RSS_GROWTH_GOAL_PCT, "fd_growth": 0,
                 "met": all(g["passed"] for g in per_process.values())},
        "samples": samples,
    }


def run(args: argparse.Namespace) -> int:
    if args.pool:
        print("runnable-k8s bench --soak: runs its own LocalPool (it samples the broker's and the workers' "
              "processes); --pool is not supported", file=sys.stderr)
        return 2
    results = soak(args)
    print(format_report(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"[bench] wrote {args.json}", file=sys.stderr, flush=True)
    return 0
