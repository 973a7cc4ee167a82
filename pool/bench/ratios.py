"""``runnable-k8s bench --ratios``: every ratio the runtime's goals are stated in, measured in one run.

Each goal compares the pool with the same LangChain runnable run in this process (the in-process
reference, measured in the same run, on the same machine, with the same number of calls in
flight), and every figure carries each process's CPU per call (:mod:`pool.bench.cpu`), not only
wall time: on a machine with few cores the CPU is what limits throughput, and the caller's share
is what offloading saves. The runs, on one default ``LocalPool`` (or ``--pool``):

* **io**: ``await asyncio.sleep(0.05)``, 1,024 separate ``ainvoke`` calls in flight: calls/s, and
  the caller's CPU per call against in-process (goal <= 0.5 x);
* **stream**: a fake chat model streaming 20 tokens 5 ms apart, 256 ``astream`` calls in flight:
  calls/s, the caller's CPU per streamed call (goal <= 0.5 x) and the time to first token p50
  (goal <= 1.2 x in-process);
* **llm**: :mod:`pool.bench.llm`'s fake chat model at 100 and at 1,000 calls in flight, the same
  prompts on both sides: end-to-end p50 (goals <= 1.05 x and <= 1.3 x in-process);
* **echo**: ``invoke`` p50 against the bare ZeroMQ floor's p50 plus in-process (goal <= 1.5 x),
  and throughput at 64 calls in flight against the brokered floor's (goal >= 35 %);
* **tokens**: the broker's CPU per relayed token, per call and marginal (:mod:`pool.bench.tokens`,
  goal <= 5 us), tokens/s per broker core, the streams that implies at 50 tokens/s, and a run with
  many streams in flight reporting what was actually relayed.

The in-flight runs are timed in the order in-process, pool, pool, in-process, half the calls per
part (:func:`pool.bench.in_flight.compare`), so a shared machine's drifting load weighs on both
sides alike. ``--ratios-scale`` shrinks the calls and the calls in flight (tests use it), and below 0.1 the token
runs' calls too; the goals hold for the full-size run only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from langchain_core.runnables import Runnable, RunnableLambda

from pool.bench import in_flight, llm, tokens, workloads
from pool.bench.cpu import CpuMeter, cpu_table, per_call_us, pool_processes
from pool.bench.measure import BareFloor, cpu_model, environment, memory_gb, percentiles, timed_samples

IO_IN_FLIGHT = 1024
STREAM_IN_FLIGHT = 256
STREAM_TOKENS = 20
STREAM_GAP_MS = 5.0
LLM_IN_FLIGHT = (100, 1000)
ECHO_IN_FLIGHT = 64
TOKEN_STREAMS = 64
CAPACITY_STREAMS = 1000
CAPACITY_TOKENS = 50  # per call, at 50 tokens/s: one-second streams

# name -> (what it compares, compare, goal, unit); a goal of None: reported, not judged.
GOALS: dict[str, tuple[str, str, float | None, str]] = {
    "io_calls_per_s_over_in_process": ("io, 1,024 in flight: calls/s, pool over in-process", ">=", 1.0, "x"),
    "io_caller_cpu_over_in_process": ("io, 1,024 in flight: caller CPU per call over in-process", "<=", 0.5, "x"),
    "stream_calls_per_s_over_in_process": ("stream, 256 in flight: calls/s, pool over in-process", ">=", None, "x"),
    "stream_caller_cpu_over_in_process": ("stream, 256 in flight: caller CPU per streamed call over in-process",
                                          "<=", 0.5, "x"),
    "stream_ttft_p50_over_in_process": ("stream, 256 in flight: time to first token p50 over in-process",
                                        "<=", 1.2, "x"),
    "llm_100_p50_over_in_process": ("llm, 100 in flight: end-to-end p50 over in-process", "<=", 1.05, "x"),
    "llm_1000_p50_over_in_process": ("llm, 1,000 in flight: end-to-end p50 over in-process", "<=", 1.3, "x"),
    "echo_p50_over_floor_plus_in_process": ("echo: invoke p50 over (bare ZeroMQ floor p50 + in-process p50)",
                                            "<=", 1.5, "x"),
    "echo_throughput_64_over_floor": ("echo, 64 in flight: calls/s over the brokered floor's", ">=", 0.35, "x"),
    "broker_us_per_token": ("broker CPU per relayed token (per call / tokens, 20 tokens)", "<=", 5.0, " us"),
    "broker_us_per_token_marginal": ("broker CPU per relayed token (marginal, 20 -> 200 tokens)", "<=", 5.0, " us"),
    "broker_tokens_per_s_per_core": ("tokens relayed per broker core, measured with many streams in flight",
                                     ">=", 200_000.0, "/s"),
}


def _ratio(top: Any, bottom: Any, digits: int = 3) -> float | None:
    if not isinstance(top, (int, float)) or not isinstance(bottom, (int, float)) or bottom <= 0:
        return None
    return round(top / bottom, digits)


def _get(figures: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(figures, dict):
            return None
        figures = figures.get(key)  # type: ignore[assignment]
    return figures


def measured(runs: dict[str, Any]) -> dict[str, float | None]:
    """Each goal's figure from the runs' figures (None when its run is missing)."""
    io, stream, echo = runs.get("io", {}), runs.get("stream", {}), runs.get("echo", {})
    floor_plus = None
    floor_p50, in_p50 = _get(echo, "floor", "latency", "p50_ms"), _get(echo, "in_process", "latency", "p50_ms")
    if floor_p50 is not None and in_p50 is not None:
        floor_plus = floor_p50 + in_p50
    return {
        "io_calls_per_s_over_in_process": _ratio(_get(io, "warm", "throughput_per_s"),
                                                 _get(io, "in_process", "throughput_per_s")),
        "io_caller_cpu_over_in_process": _ratio(_get(io, "warm", "cpu_us_per_call", "client"),
                                                _get(io, "in_process", "cpu_us_per_call", "client")),
        "stream_calls_per_s_over_in_process": _ratio(_get(stream, "warm", "throughput_per_s"),
                                                     _get(stream, "in_process", "throughput_per_s")),
        "stream_caller_cpu_over_in_process": _ratio(_get(stream, "warm", "cpu_us_per_call", "client"),
                                                    _get(stream, "in_process", "cpu_us_per_call", "client")),
        "stream_ttft_p50_over_in_process": _ratio(_get(stream, "warm", "ttft", "p50_ms"),
                                                  _get(stream, "in_process", "ttft", "p50_ms")),
        "llm_100_p50_over_in_process": _get(runs, "llm_100", "ratios", "p50_warm_over_in_process"),
        "llm_1000_p50_over_in_process": _get(runs, "llm_1000", "ratios", "p50_warm_over_in_process"),
        "echo_p50_over_floor_plus_in_process": _ratio(_get(echo, "warm", "latency", "p50_ms"), floor_plus),
        "echo_throughput_64_over_floor": _ratio(_get(echo, "warm", "throughput", "throughput_per_s"),
                                                _get(echo, "floor", "throughput", "throughput_per_s")),
        "broker_us_per_token": _get(runs, "tokens", "broker_us_per_token_short"),
        "broker_us_per_token_marginal": _get(runs, "tokens", "broker_us_per_token_marginal"),
        "broker_tokens_per_s_per_core": _get(runs, "capacity", "relayed_tokens_per_s_per_broker_core"),
    }


def goals(runs: dict[str, Any]) -> dict[str, Any]:
    """Every goal with its figure and verdict: ``met`` is True/False, or None for a figure without a
    goal or a run that did not happen."""
    found: dict[str, Any] = {}
    for name, value in measured(runs).items():
        what, compare, goal, unit = GOALS[name]
        met = None
        if goal is not None and value is not None:
            met = value <= goal if compare == "<=" else value >= goal
        found[name] = {"what": what, "measured": value, "goal": goal, "compare": compare, "unit": unit, "met": met}
    return found


# ---------------------------------------------------------------------- the runs


def _scaled(args: argparse.Namespace) -> Callable[..., int]:
    scale = args.ratios_scale

    def n(value: int, least: int = 1) -> int:
        return max(least, round(value * scale))

    return n


def _pair(reference: Runnable, remote: Runnable, count: int, calls: int, streamed: bool,
          processes: dict[str, int]) -> dict[str, Any]:
    """The same runnable in this process and on the pool, ``count`` separate calls in flight each,
    timed A B B A (:func:`pool.bench.in_flight.compare`)."""
    inputs = in_flight.same_value("prompt" if streamed else 1)
    return in_flight.compare(reference, remote, inputs, count, calls, streamed, processes)


def _timed_latency(call: Callable[[], Any], calls: int, processes: dict[str, int]) -> dict[str, Any]:
    for _ in range(min(50, calls)):
        call()
    meter = CpuMeter(processes).start()
    samples = timed_samples(call, calls, 0)
    cpu = meter.stop()
    return {**percentiles(samples), "cpu_us_per_call": per_call_us(cpu["cpu_s"], calls)}


def echo_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The bare ZeroMQ floor (:class:`pool.bench.measure.BareFloor`): latency, and throughput at 64
    in flight, with its broker's and workers' CPU per call."""
    n = _scaled(args)
    floor = BareFloor(args.pool_workers, slots=16)
    try:
        processes = {"client": os.getpid(), "broker": floor.procs[0].pid}
        processes.update({f"worker-{i}": p.pid for i, p in enumerate(floor.procs[1:], 1)})
        latency = _timed_latency(floor.call, n(args.calls, 20), processes)
        tasks = n(args.floor_tasks, 100)
        meter = CpuMeter(processes).start()
        rate = floor.throughput(tasks, ECHO_IN_FLIGHT)
        cpu = meter.stop()
        throughput = {"in_flight": ECHO_IN_FLIGHT, "calls": tasks, "throughput_per_s": round(rate, 1),
                      "cpu_us_per_call": per_call_us(cpu["cpu_s"], tasks)}
    finally:
        floor.close()
    return {"latency": latency, "throughput": throughput}


@contextmanager
def _pool(args: argparse.Namespace) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    if args.pool:
        yield args.pool, None, {"address": args.pool, "local": False}
        return
    from pool.local import LocalPool

    with LocalPool(slots=args.slots, workers=args.pool_workers) as pool:
        yield pool.address, pool, {"address": pool.address, "local": True, "workers": args.pool_workers,
                                   "slots": args.slots}


def _step(text: str, enabled: bool) -> None:
    if enabled:
        print(f"[bench] ratios: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of :data:`GOALS`, then their figures and verdicts."""
    from pool.client.runnable import RunnableK8s

    n = _scaled(args)
    say = not args.no_progress
    started = dt.datetime.now(dt.timezone.utc)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, Any] = {}
    _step("bare ZeroMQ floor (echo)", say)
    floor = echo_floor(args)
    with _pool(args) as (address, pool, pool_info):
        processes = pool_processes(pool)

        def remote(runnable: Runnable) -> Runnable:
            return RunnableK8s(bound=runnable, pool=address, mode="warm", keys=args.keys, timeout=600)

        _step("echo latency and throughput", say)
        echo = RunnableLambda(workloads.echo, name="echo")
        warm_echo = remote(echo)
        runs["echo"] = {
            "floor": floor,
            "in_process": {"latency": _timed_latency(lambda: echo.invoke(1), n(args.calls, 20),
                                                     {"client": os.getpid()})},
            "warm": {"latency": _timed_latency(lambda: warm_echo.invoke(1), n(args.calls, 20), processes),
                     "throughput": in_flight.measure(warm_echo, in_flight.same_value(1), ECHO_IN_FLIGHT,
                                                     n(args.floor_tasks // 2, 100), False, processes)},
        }
        _step(f"io: {n(IO_IN_FLIGHT)} ainvoke calls in flight", say)
        io = workloads.io_runnable(args.io_latency_ms / 1000)
        runs["io"] = _pair(io, remote(io), n(IO_IN_FLIGHT), 4 * n(IO_IN_FLIGHT), False, processes)
        _step(f"stream: {n(STREAM_IN_FLIGHT)} astream calls in flight", say)
        stream = workloads.stream_runnable(STREAM_TOKENS, STREAM_GAP_MS)
        runs["stream"] = _pair(stream, remote(stream), n(STREAM_IN_FLIGHT), 4 * n(STREAM_IN_FLIGHT), True,
                               processes)
        model = workloads.build("llm", llm_latency_ms=args.llm_latency_ms, llm_tokens=args.llm_tokens,
                                llm_sigma=args.llm_sigma)
        warm_model = remote(model)
        for count in LLM_IN_FLIGHT:
            k = n(count, 2)
            _step(f"llm: {k} streamed calls in flight", say)
            # the same prompts (hence the same latencies) on both sides, timed A B B A
            pair: dict[str, Any] = {"in_flight": k, "calls": 2 * k,
                                    **in_flight.compare(model, warm_model, llm.prompts, k, 2 * k, True, processes,
                                                        warmup=min(k, 100))}
            pair["ratios"] = llm.ratios(pair["warm"], pair["in_process"])
            runs[f"llm_{count}"] = pair
        _step("broker CPU per token: 20 and 200 tokens per call", say)
        shorter = min(1.0, args.ratios_scale * 10)  # a small scale also shortens the token runs' calls
        runs["tokens"] = tokens.cost_run(remote, processes, gap_ms=STREAM_GAP_MS * shorter,
                                         streams=n(TOKEN_STREAMS, 4), calls=n(16 * TOKEN_STREAMS, 8))
        streams = n(CAPACITY_STREAMS, 8)
        if pool_info.get("local"):  # streams beyond the pool's slots would queue, not stream: offer what it runs
            streams = min(streams, args.pool_workers * args.slots)
        _step(f"token capacity: {streams} streams in flight", say)
        per_call = max(5, round(CAPACITY_TOKENS * shorter))
        runs["capacity"] = tokens.capacity_run(remote(tokens.capacity_runnable(per_call)), processes,
                                               streams=streams, tokens=per_call, seconds=max(1.0, 5 * shorter))
    finished = dt.datetime.now(dt.timezone.utc)
    env = environment()
    env.update({"started_at": started.isoformat(timespec="seconds"),
                "finished_at": finished.isoformat(timespec="seconds"),
                "duration_s": round((finished - started).total_seconds(), 1), "load_average_at_start": load_at_start,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "cpu_model": cpu_model(),
                "memory_gb": memory_gb(), "command": "runnable-k8s bench " + " ".join(sys.argv[2:])})
    settings = {"scale": args.ratios_scale, "io_latency_ms": args.io_latency_ms, "stream_tokens": STREAM_TOKENS,
                "stream_gap_ms": STREAM_GAP_MS, "llm_latency_ms": args.llm_latency_ms, "llm_sigma": args.llm_sigma,
                "llm_tokens": args.llm_tokens, "pool": pool_info}
    return {"kind": "ratios", "environment": env, "settings": settings, "runs": runs, "goals": goals(runs)}


# ---------------------------------------------------------------------- the report


def _ms(value: Any) -> str:
    return f"{value:>9.2f}" if isinstance(value, (int, float)) else f"{'-':>9}"


def _run_rows(title: str, pair: dict[str, Any], streamed: bool) -> list[str]:
    lines = [title, f"  {'runs as':24} {'calls/s':>9} {'p50 ms':>9} {'p99 ms':>9}"
                    + (f" {'TTFT p50':>9} {'TTFT p99':>9}" if streamed else "") + f" {'errors':>7} {'load':>6}"]
    rows = []
    for label, key in (("in-process", "in_process"), ("warm", "warm")):
        r = pair.get(key) or {}
        e2e, ttft = r.get("end_to_end", {}), r.get("ttft", {})
        text = (f"  {label:24} {r.get('throughput_per_s', '-'):>9} {_ms(e2e.get('p50_ms'))} {_ms(e2e.get('p99_ms'))}")
        if streamed:
            text += f" {_ms(ttft.get('p50_ms'))} {_ms(ttft.get('p99_ms'))}"
        lines.append(text + f" {r.get('errors', '-'):>7} {r.get('load_1m', '-'):>6}")
        if r.get("cpu_us_per_call"):
            rows.append((label, r["cpu_us_per_call"]))
    return lines + cpu_table(rows)


def _verdict(goal: dict[str, Any]) -> str:
    if goal["measured"] is None:
        return "not measured"
    if goal["goal"] is None:
        return "(no goal: reported)"
    return f"goal {goal['compare']} {goal['goal']:g}{goal['unit']}: " + ("MET" if goal["met"] else "NOT MET")


def format_report(results: dict[str, Any]) -> str:
    """The text report: each run with each process's CPU per call, the token figures, then ratios."""
    env, settings, runs = results["environment"], results["settings"], results["runs"]
    pool = settings.get("pool", {})
    where = (f"LocalPool ({pool.get('workers')} workers x {pool.get('slots')} slots)" if pool.get("local")
             else f"pool {pool.get('address')}")
    lines = [f"runnable-k8s bench --ratios: warm = {where}; every figure against the same runnable in this "
             f"process, same run (scale {settings['scale']:g})",
             f"machine: {env.get('cpus')} CPUs ({env.get('cpu_model')}), Python {env.get('python')}, "
             f"langchain-core {env.get('langchain_core')}, pyzmq {env.get('pyzmq')}, load at start "
             f"{env.get('load_average_at_start')}, at end {env.get('load_average_at_end')}",
             "(load: the machine's 1-minute load average at the end of each run; on a shared machine a ratio "
             "whose two sides ran under different loads says little)", ""]
    echo = runs.get("echo")
    if echo:
        lines.append(f"echo: invoke one at a time; throughput {ECHO_IN_FLIGHT} in flight")
        lines.append(f"  {'runs as':24} {'p50 ms':>9} {'p99 ms':>9} {'calls/s':>9}")
        cpu_rows = []
        for label, key in (("in-process", "in_process"), ("bare ZeroMQ floor", "floor"), ("warm", "warm")):
            figures = echo.get(key, {})
            lat, tp = figures.get("latency", {}), figures.get("throughput", {})
            lines.append(f"  {label:24} {_ms(lat.get('p50_ms'))} {_ms(lat.get('p99_ms'))} "
                         f"{tp.get('throughput_per_s', '-'):>9}")
            if lat.get("cpu_us_per_call"):
                cpu_rows.append((f"{label}, one at a time", lat["cpu_us_per_call"]))
            if tp.get("cpu_us_per_call"):
                cpu_rows.append((f"{label}, {ECHO_IN_FLIGHT} in flight", tp["cpu_us_per_call"]))
        lines.extend(cpu_table(cpu_rows))
        lines.append("")
    if runs.get("io"):
        title = (f"io: asyncio.sleep({settings['io_latency_ms'] / 1000:g}), {runs['io']['warm']['in_flight']} "
                 "separate ainvoke calls in flight")
        lines.extend(_run_rows(title, runs["io"], False))
        lines.append("")
    if runs.get("stream"):
        lines.extend(_run_rows(f"stream: {settings['stream_tokens']} tokens {settings['stream_gap_ms']:g} ms apart, "
                               f"{runs['stream']['warm']['in_flight']} astream calls in flight", runs["stream"], True))
        lines.append("")
    for count in LLM_IN_FLIGHT:
        pair = runs.get(f"llm_{count}")
        if pair:
            lines.extend(_run_rows(f"llm: fake chat model, median {settings['llm_latency_ms']:g} ms, "
                                   f"{settings['llm_tokens']} tokens, {pair['in_flight']} astream calls in flight",
                                   pair, True))
            lines.append("")
    if runs.get("tokens"):
        lines.extend(tokens.format_lines(runs["tokens"], runs.get("capacity")))
        lines.append("")
    lines.append("ratios (each goal, its figure, met or not)")
    if settings["scale"] != 1:
        lines.append(f"  (--ratios-scale {settings['scale']:g}: fewer calls in flight than the goals are stated for)")
    for goal in results["goals"].values():
        value = goal["measured"]
        figure = f"{value:,}{goal['unit']}" if value is not None else "-"
        lines.append(f"  {goal['what']:78} {figure:>10}  {_verdict(goal)}")
    return "\n".join(lines).rstrip()


def main(args: argparse.Namespace) -> int:
    """``runnable-k8s bench --ratios``: measure, print, write ``--json``."""
    from pool.bench import report

    if args.replot:
        import json

        with open(args.replot) as f:
            results = json.load(f)
    else:
        results = run(args)
    print(format_report(results), flush=True)
    if args.json:
        report.write_json(results, args.json)
        print(f"[bench] wrote {args.json}", file=sys.stderr, flush=True)
    return 0
