"""runnable-k8s bench: warm pool against a fresh worker per call, measured in one run.

For each mode (``warm``: a pool of long-lived workers; ``ephemeral``: a fresh one-shot worker per
call, a local subprocess or a real Pod) and each workload of :mod:`pool.bench.workloads`, it
measures

* latency p50/p95/p99 of single sequential calls (and, for ``stream``, the time to first chunk);
* throughput at each ``--in-flight`` (calls in flight);
* overhead over running the same runnable in-process (measured in the same run);

and, in the same run, the bare pyzmq floor of :mod:`pool.bench.measure` (``BareFloor``), a scaling run of
the I/O-bound workload against the number of warm workers, and the figures the first bench
reported (warm p50 against floor + in-process, 64-in-flight throughput, 1 KB vs 1 MB runnable).
Tables and JSON come from :mod:`pool.bench.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_core.runnables import Runnable, RunnableLambda

from pool.bench import ephemeral_floor, llm, soak, workloads
from pool.bench.arguments import LLM_DEFAULT_IN_FLIGHT, MODES, add_arguments  # noqa: F401 - add_arguments: the old import path
from pool.bench.cpu import CpuMeter, per_call_us, pool_processes
from pool.bench.measure import BareFloor, cpu_model, environment, memory_gb, percentiles, time_calls, timed_samples
from pool.bench.report import plural
from pool.client.runnable import RunnableK8s
from pool.local import LocalPool

EPHEMERAL_TIMEOUT = 300.0  # an ephemeral call's timeout in the bench (a Pod may need a while)


class Progress:
    """One tqdm bar on stderr over the planned steps; the current step and call count as text."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # without the bench extra: one line per step instead of a bar
                return
            self.bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}]{postfix}")

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[Callable[[str], None]]:
        if self.bar is None:
            print(f"[bench] {description}", file=sys.stderr, flush=True)
            yield lambda _: None
            return
        self.bar.set_description_str(f"[bench] {description}"[:60].ljust(60))
        self.bar.set_postfix_str("")
        try:
            yield self.bar.set_postfix_str
        finally:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- timing helpers


def _summary(samples: list[float]) -> dict[str, float]:
    """pool.bench.measure's percentiles, plus min, max and the quartiles and p1 the plot's boxes are drawn from."""
    figures = percentiles(samples)
    ordered = sorted(samples)
    for name, q in (("p1_ms", 0.01), ("p25_ms", 0.25), ("p75_ms", 0.75)):
        figures[name] = round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 4)
    figures["min_ms"] = round(ordered[0] * 1000, 4)
    figures["max_ms"] = round(ordered[-1] * 1000, 4)
    return figures


def _first_chunk(stream: Callable[[], Iterator[Any]]) -> tuple[float, float]:
    """(time to first chunk, time to the end of the stream), in seconds."""
    started = time.perf_counter()
    first = None
    for _ in stream():
        if first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (first if first is not None else total), total


async def _throughput_for(runnable: Runnable, value: Any, in_flight: int, seconds: float,
                          meter: CpuMeter | None = None) -> tuple[float, int]:
    """``in_flight`` async callers calling ``ainvoke`` back to back for ``seconds``: calls/s; ``meter``
    measures each process's CPU over the timed calls (not the warm-up)."""
    for _ in range(2):  # warm-up: every worker has the runnable, connections are up
        await asyncio.gather(*(runnable.ainvoke(value) for _ in range(in_flight)))
    if meter is not None:
        meter.start()
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    last = started

    async def caller() -> None:
        nonlocal done, last
        while time.perf_counter() < deadline:
            await runnable.ainvoke(value)
            done += 1
            last = time.perf_counter()

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    if meter is not None:
        meter.stop()
    return done / (last - started), done


def _threads_throughput(runnable: Runnable, value: Any, in_flight: int, tasks: int) -> float:
    """``tasks`` independent ``invoke`` calls from ``in_flight`` threads: calls/s.

    Independent calls, like ``in_flight`` users of an application, rather than one ``batch``: with
    the kubernetes launcher a batch shares one Kubernetes ApiClient between its calls, and the
    kubernetes client's ``stream()`` (the attach) is not thread-safe on a shared ApiClient
    (kubernetes-client/python#928: "Handshake status 200 OK")."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="bench-ephemeral") as pool:
        for future in [pool.submit(runnable.invoke, value) for _ in range(tasks)]:
            future.result()
    return tasks / (time.perf_counter() - started)


@contextlib.contextmanager
def _launch_times(launcher: str) -> Iterator[list[float]]:
    """Seconds each one-shot worker took to be ready for its session: for a Pod, create + scheduled +
    started + attached; for a local subprocess, only the fork/exec (its start-up is then in the session)."""
    launcher_class: type[Any]  # either launcher class: its launch method is swapped for a timed one
    if launcher == "kubernetes":
        from pool.ephemeral.k8s_launcher import KubernetesLauncher

        launcher_class = KubernetesLauncher
    else:
        from pool.ephemeral.local_launcher import LocalLauncher

        launcher_class = LocalLauncher
    original = launcher_class.launch
    times: list[float] = []

    def timed_launch(self: Any, deadline: float | None) -> Any:
        started = time.perf_counter()
        channel = original(self, deadline)
        times.append(time.perf_counter() - started)
        return channel

    launcher_class.launch = timed_launch  # type: ignore[method-assign]
    try:
        yield times
    finally:
        launcher_class.launch = original  # type: ignore[method-assign]


def _run_stream_or_invoke(workload: str, runnable: Runnable, value: Any) -> Callable[[], Any]:
    if workload == "stream":
        return lambda: list(runnable.stream(value))
    return lambda: runnable.invoke(value)


def _timed_stream(runnable: Runnable, value: Any, firsts: list[float]) -> Callable[[], None]:
    """One streamed call; its time to first chunk goes to ``firsts``."""

    def call() -> None:
        first, _ = _first_chunk(lambda: runnable.stream(value))
        firsts.append(first)

    return call


def _in_process_call(workload: str, runnable: Runnable, value: Any, loop: asyncio.AbstractEventLoop,
                     firsts: list[float]) -> Callable[[], Any]:
    """One in-process call of ``workload`` (async ones on ``loop``); a stream's time to first
    chunk goes to ``firsts``."""
    if workload == "echo":
        return lambda: runnable.invoke(value)
    if workload == "io":
        return lambda: loop.run_until_complete(runnable.ainvoke(value))

    async def consume() -> float:
        started = time.perf_counter()
        first = None
        async for _ in runnable.astream(value):
            if first is None:
                first = time.perf_counter() - started
        return first or 0.0

    return lambda: firsts.append(loop.run_until_complete(consume()))


# ---------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.processes: dict[str, int] = pool_processes(None)  # the warm pool's, once it runs
        self.payload: Any = os.urandom(args.payload_bytes) if args.payload_bytes > 0 else 1
        chosen = list(dict.fromkeys(args.workload))
        for name in chosen:
            if name not in workloads.WORKLOADS:
                raise SystemExit(f"runnable-k8s bench: unknown workload {name!r} ({', '.join(workloads.WORKLOADS)})")
        # llm is measured its own way (pool.bench.llm): many streamed calls in flight, warm mode only
        self.llm = "llm" in chosen
        self.workloads = [name for name in chosen if name != "llm"]
        self.modes = list(dict.fromkeys(args.modes))
        if self.llm and "warm" not in self.modes:
            print("runnable-k8s bench: the llm workload runs in warm mode only (1,000 calls in flight); "
                  "skipped", file=sys.stderr)
        self.concurrency = sorted(set(args.in_flight or [1, 8, 64]))  # calls in flight, one figure each
        self.llm_in_flight = args.llm_in_flight or (max(args.in_flight) if args.in_flight
                                                    else LLM_DEFAULT_IN_FLIGHT)
        self.llm_calls = args.llm_calls or 2 * self.llm_in_flight
        self.scaling = sorted({n for n in args.workers if n > 0})
        for mode in self.modes:
            if mode not in MODES:
                raise SystemExit(f"runnable-k8s bench: unknown mode {mode!r} (warm, ephemeral)")
        if self.args.pool or "io" not in self.workloads or "warm" not in self.modes:
            self.scaling = []  # the workers of someone else's pool are not ours to scale; io only
        self.chart = _chart_release(args.chart) if getattr(args, "chart", None) else None
        if self.chart and "warm" not in self.modes:
            raise SystemExit("runnable-k8s bench: --chart measures warm calls: add warm to --modes")

    def runnable(self, workload: str) -> Runnable:
        a = self.args
        return workloads.build(workload, io_latency_ms=a.io_latency_ms, stream_chunks=a.stream_chunks,
                               stream_chunk_ms=a.stream_chunk_ms, llm_latency_ms=a.llm_latency_ms,
                               llm_tokens=a.llm_tokens, llm_sigma=a.llm_sigma)

    # -------------------------------------------------------------- planning (for the progress bar)

    def plan(self) -> int:
        steps = len(self.workloads)  # in-process
        if self.llm and "warm" in self.modes:
            steps += 2  # llm: in-process, warm
        if not self.workloads:
            return steps
        if "warm" in self.modes:
            steps += 2  # floor latency + floor throughput
            steps += len(self.workloads) * (1 + len(self.concurrency))
            steps += 0 if self.args.no_big_runnable else 1
            steps += len(self.scaling)
            steps += 1 if self.chart else 0
        if "ephemeral" in self.modes:
            eph_conc = [c for c in self.concurrency if c <= self.args.ephemeral_max_in_flight]
            steps += len(self.workloads) * (1 + len(eph_conc))
        return steps

    # -------------------------------------------------------------- pieces

    def in_process(self, progress: Progress) -> dict[str, Any]:
        results: dict[str, Any] = {}
        loop = asyncio.new_event_loop()
        try:
            for workload in self.workloads:
                with progress.step(f"in-process {workload}") as tick:
                    firsts: list[float] = []
                    call = _in_process_call(workload, self.runnable(workload), self.payload, loop, firsts)
                    n, warmup = (self.args.calls, 50) if workload == "echo" else (self.args.slow_calls, 5)
                    meter = CpuMeter({"client": os.getpid()})
                    for _ in range(warmup):
                        call()
                    meter.start()
                    samples = timed_samples(call, n, 0, tick)
                    meter.stop()
                    results[workload] = _summary(samples)
                    results[workload]["cpu_us_per_call"] = per_call_us(meter.result["cpu_s"], n)
                    if workload == "stream":
                        firsts = firsts[warmup:]
                        results[workload]["ttfc"] = _summary(firsts)
        finally:
            loop.close()
        return results

    def floor(self, progress: Progress) -> dict[str, Any]:
        a = self.args
        floor = BareFloor(a.pool_workers, slots=16)
        try:
            with progress.step(f"bare pyzmq floor: latency, {plural(a.pool_workers, 'worker')}") as tick:
                samples = timed_samples(floor.call, a.calls, 50, tick)
                result: dict[str, Any] = _summary(samples)
            with progress.step("bare pyzmq floor: throughput") as tick:
                by_conc = {}
                for c in self.concurrency:
                    tick(f"{c} in flight")
                    by_conc[str(c)] = round(floor.throughput(a.floor_tasks, c), 1)
                result["throughput_by_concurrency"] = by_conc
                result["throughput_per_s"] = by_conc[str(max(self.concurrency))]
        finally:
            floor.close()
        return result

    def warm(self, progress: Progress) -> dict[str, Any]:
        a = self.args
        with self._warm_pool(a.pool_workers) as (address, pool_info):
            result = self._mode("warm", progress, lambda r: RunnableK8s(bound=r, pool=address, mode="warm",
                                                                         keys=a.keys, timeout=120))
            result["pool"] = pool_info
            if not a.no_big_runnable:
                with progress.step("warm: repeated calls, 1 KB vs 1 MB runnable") as tick:
                    result["big_runnable"] = self._big_runnable(address, tick)
        return result

    @contextlib.contextmanager
    def _warm_pool(self, workers: int) -> Iterator[tuple[str, dict[str, Any]]]:
        a = self.args
        if a.pool:
            self.processes = pool_processes(None)  # someone else's pool: only this process's CPU
            yield a.pool, {"address": a.pool, "local": False}
            return
        with LocalPool(workers=workers, slots=a.slots) as pool:
            self.processes = pool_processes(pool)
            yield pool.address, {"address": pool.address, "local": True, "workers": workers, "slots": a.slots}

    def _big_runnable(self, address: str, tick: Callable[[str], None]) -> dict[str, Any]:
        small_blob = os.urandom(1024)
        big_blob = os.urandom(1024 * 1024)
        small: RunnableK8s[Any, Any] = RunnableK8s(bound=RunnableLambda(lambda x: len(small_blob) and x),
                                                   pool=address, mode="warm", keys=self.args.keys)
        big: RunnableK8s[Any, Any] = RunnableK8s(bound=RunnableLambda(lambda x: len(big_blob) and x),
                                                 pool=address, mode="warm", keys=self.args.keys)
        n = max(1, self.args.calls // 2)
        tick("1 KB")
        one_kb = time_calls(lambda: small.invoke(1), n, warmup=min(50, n))
        tick("1 MB")
        one_mb = time_calls(lambda: big.invoke(1), n, warmup=min(50, n))
        return {"runnable_1kb": one_kb, "runnable_1mb": one_mb,
                "p50_ratio_1mb_over_1kb": round(one_mb["p50_ms"] / one_kb["p50_ms"], 3)}

    def ephemeral(self, progress: Progress) -> dict[str, Any]:
        a = self.args
        options: dict[str, Any] = {"mode": "ephemeral", "launcher": a.launcher, "timeout": EPHEMERAL_TIMEOUT}
        if a.launcher == "kubernetes":
            options.update(k8s_config=a.kubeconfig or os.environ.get("KUBECONFIG"), k8s_namespace=a.namespace,
                           k8s_container_image=a.image, k8s_image_pull_policy=a.image_pull_policy,
                           k8s_secret_name=a.secret)
        result = self._mode("ephemeral", progress, lambda r: RunnableK8s(bound=r, **options))
        result["launcher"] = a.launcher
        if a.launcher == "kubernetes":
            result["cluster"] = {"namespace": a.namespace, "image": a.image, "image_pull_policy": a.image_pull_policy}
        return result

    def ephemeral_floor_probes(self) -> dict[str, tuple[str, Callable[[], float]]]:
        """What a fresh worker per call cannot go below (:mod:`pool.bench.ephemeral_floor`), as
        key -> (command, a probe returning the seconds one run took): Python + langchain_core's
        start (bare, and running one RunnableLambda) and, on Kubernetes, a minimal Pod's
        create -> Running."""
        a = self.args
        bare, runnable = ephemeral_floor.BARE_START, ephemeral_floor.RUNNABLE_START
        probes: dict[str, tuple[str, Callable[[], float]]] = {
            "bare_start": (f'python -c "{bare}"', lambda: ephemeral_floor.timed_start(bare)),
            "runnable_start": (f'python -c "{runnable}"', lambda: ephemeral_floor.timed_start(runnable)),
        }
        if a.launcher == "kubernetes":
            from pool.ephemeral.k8s_launcher import KubernetesLauncher

            launcher = KubernetesLauncher(namespace=a.namespace, image=a.image, image_pull_policy=a.image_pull_policy,
                                          k8s_config=a.kubeconfig or os.environ.get("KUBECONFIG"))
            probes["pod_start"] = (" ".join(ephemeral_floor.POD_FLOOR_COMMAND) + " (create -> Running)",
                                   lambda: ephemeral_floor.time_pod_start(launcher))
        return probes

    def _mode(self, mode: str, progress: Progress, wrap: Callable[[Runnable], RunnableK8s]) -> dict[str, Any]:
        a = self.args
        per_workload: dict[str, Any] = {}
        floor_figures: dict[str, Any] = {}
        ephemeral = mode == "ephemeral"
        for workload in self.workloads:
            remote = wrap(self.runnable(workload))
            figures: dict[str, Any] = {}
            launch_times: contextlib.AbstractContextManager[list[float]] = (
                _launch_times(a.launcher) if ephemeral else contextlib.nullcontext([]))
            # ephemeral mode's floors: one of each after each call of its first workload
            probes = self.ephemeral_floor_probes() if ephemeral and workload == self.workloads[0] else {}
            with progress.step(f"{mode} {workload}: latency" + (" and floors" if probes else "")) as tick, \
                    launch_times as launches:
                if ephemeral:
                    n, warmup = a.ephemeral_calls, 1
                else:
                    n, warmup = (a.calls, 50) if workload == "echo" else (a.slow_calls, 5)
                firsts: list[float] = []
                call = (_timed_stream(remote, self.payload, firsts) if workload == "stream"
                        else _run_stream_or_invoke(workload, remote, self.payload))
                if probes:
                    samples, floors = ephemeral_floor.interleaved(
                        call, {key: probe for key, (_, probe) in probes.items()}, n, warmup, tick)
                    floor_figures[workload] = {key: {**_summary(floors[key]), "command": command}
                                               for key, (command, _) in probes.items()}
                else:
                    samples = timed_samples(call, n, warmup, tick)
                figures.update(_summary(samples))
                if workload == "stream":
                    figures["ttfc"] = _summary(firsts[warmup:])
            if ephemeral and a.launcher == "kubernetes" and len(launches) > warmup:
                # create -> scheduled -> running -> attached, per call (the rest is the session and delete)
                figures["pod_start_and_attach"] = _summary(launches[warmup:])
            by_conc: dict[str, float | None] = {}
            cpu_by_conc: dict[str, dict[str, float | None]] = {}
            for c in self.concurrency:
                if ephemeral and c > a.ephemeral_max_in_flight:
                    by_conc[str(c)] = None
                    continue
                with progress.step(f"{mode} {workload}: throughput, {c} in flight") as tick:
                    if ephemeral:
                        tasks = max(a.ephemeral_calls, c)
                        tick(plural(tasks, "call"))
                        by_conc[str(c)] = round(_threads_throughput(remote, self.payload, c, tasks), 3)
                    else:
                        meter = CpuMeter(self.processes)
                        rate, done = asyncio.run(_throughput_for(remote, self.payload, c, a.throughput_seconds,
                                                                 meter))
                        tick(plural(done, "call"))
                        by_conc[str(c)] = round(rate, 1)
                        cpu_by_conc[str(c)] = per_call_us(meter.result["cpu_s"], done)
            figures["throughput_by_concurrency"] = by_conc
            if cpu_by_conc:
                figures["cpu_us_per_call_by_concurrency"] = cpu_by_conc
            measured = [float(v) for v in by_conc.values() if v is not None]
            figures["throughput_per_s"] = (by_conc.get(str(max(self.concurrency)))
                                           or (max(measured) if measured else None))
            figures["best_throughput_per_s"] = max(measured) if measured else None
            per_workload[workload] = figures
        result: dict[str, Any] = {"workloads": per_workload}
        for workload, floor in floor_figures.items():
            result["floor"] = {"workload": workload, **floor}
        return result

    def llm_run(self, progress: Progress) -> dict[str, Any]:
        """The llm workload: the same fake chat model, ``llm_in_flight`` streamed calls at once, in
        this process's asyncio loop (the reference) and on the warm pool."""
        a = self.args
        in_flight, calls = self.llm_in_flight, self.llm_calls
        warmup = min(in_flight, 100)  # ships the model to the workers, opens the connections
        model = self.runnable("llm")
        result: dict[str, Any] = {
            "in_flight": in_flight, "calls": calls, "warmup_calls": warmup,
            "settings": {"latency_ms": a.llm_latency_ms, "sigma": a.llm_sigma, "tokens": a.llm_tokens,
                         "model": type(model).__name__, "call": "astream"},
        }
        with progress.step(f"llm: in-process, {in_flight} in flight") as tick:
            result["in_process"] = llm.measure(model, calls, in_flight, warmup, tick)
        with progress.step(f"llm: warm, {in_flight} in flight") as tick, \
                self._warm_pool(a.pool_workers) as (address, pool_info):
            remote = RunnableK8s(bound=model, pool=address, mode="warm", keys=a.keys, timeout=600)
            result["warm"] = llm.measure(remote, calls, in_flight, warmup, tick, self.processes)
            result["pool"] = pool_info
        result["ratios"] = llm.ratios(result["warm"], result["in_process"])
        return result

    def scaling_run(self, progress: Progress) -> dict[str, Any]:
        a = self.args
        in_flight = a.scaling_in_flight or max(max(self.concurrency), 2 * max(self.scaling) * a.slots)
        throughput: dict[str, float] = {}
        for n in self.scaling:
            with progress.step(f"scaling: io throughput with {plural(n, 'warm worker')}") as tick, \
                    LocalPool(workers=n, slots=a.slots) as pool:
                remote = RunnableK8s(bound=self.runnable("io"), pool=pool.address, mode="warm", timeout=120)
                rate, done = asyncio.run(_throughput_for(remote, self.payload, in_flight, a.throughput_seconds))
                tick(plural(done, "call"))
                throughput[str(n)] = round(rate, 1)
        ideal_per_worker = a.slots / (a.io_latency_ms / 1000)
        result: dict[str, Any] = {
            "workload": "io", "io_latency_ms": a.io_latency_ms, "in_flight": in_flight, "slots_per_worker": a.slots,
            "workers": self.scaling, "throughput_by_workers": throughput,
            "ideal_by_workers": {str(n): round(min(n * ideal_per_worker, in_flight / (a.io_latency_ms / 1000)), 1)
                                 for n in self.scaling},
        }
        low, high = self.scaling[0], self.scaling[-1]
        if high > low:
            result[f"speedup_{high}_over_{low}"] = round(throughput[str(high)] / throughput[str(low)], 3)
        return result

    def chart_warm(self, progress: Progress) -> dict[str, Any]:
        """Warm calls through the installed chart (``--chart``): from a client Pod, from this host
        over k8s:// (:mod:`pool.bench.chart_warm`), with this run's workloads and settings."""
        from pool.bench.chart_warm import measure_chart_warm

        a = self.args
        namespace, release = self.chart or ("", "")
        same_workloads = ["--payload-bytes", str(a.payload_bytes), "--io-latency-ms", str(a.io_latency_ms),
                          "--stream-chunks", str(a.stream_chunks), "--stream-chunk-ms", str(a.stream_chunk_ms)]
        with progress.step(f"warm through the chart {namespace}/{release}") as tick:
            return measure_chart_warm(
                namespace, release, image=a.image, calls=a.calls, in_flight=self.concurrency,
                kubeconfig=a.kubeconfig or os.environ.get("KUBECONFIG"), progress=tick, workloads=self.workloads,
                slow_calls=a.slow_calls, throughput_seconds=a.throughput_seconds, client=a.chart_client,
                keys=a.chart_keys, image_pull_policy=a.image_pull_policy, extra_args=same_workloads)

    # -------------------------------------------------------------- everything

    def run(self) -> dict[str, Any]:
        a = self.args
        started = dt.datetime.now(dt.timezone.utc)
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]
        results: dict[str, Any] = {"modes": {}}
        progress = Progress(self.plan(), enabled=not a.no_progress)
        try:
            results["in_process"] = {"workloads": self.in_process(progress)}
            for mode in self.modes if self.workloads else []:  # in the order given: `--modes ephemeral,warm`
                if mode == "warm":                                 # needs a cluster first
                    results["floor"] = self.floor(progress)
                    results["modes"]["warm"] = self.warm(progress)
                    if self.chart:
                        results["chart_warm"] = self.chart_warm(progress)
                else:
                    results["modes"]["ephemeral"] = self.ephemeral(progress)
            results["modes"] = {mode: results["modes"][mode] for mode in MODES if mode in results["modes"]}
            if self.scaling:
                results["scaling"] = self.scaling_run(progress)
            if self.llm and "warm" in self.modes:
                results["llm"] = self.llm_run(progress)
        finally:
            progress.close()
        finished = dt.datetime.now(dt.timezone.utc)
        results["environment"] = self.environment(started, finished)
        results["settings"] = self.settings()
        summarize(results)
        return results

    def environment(self, started: dt.datetime, finished: dt.datetime) -> dict[str, Any]:
        env = environment()
        env.update({
            "started_at": started.isoformat(timespec="seconds"), "finished_at": finished.isoformat(timespec="seconds"),
            "duration_s": round((finished - started).total_seconds(), 1),
            "load_average_at_start": self.load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "cpu_model": cpu_model(), "memory_gb": memory_gb(),
            "command": "runnable-k8s bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        })
        if ("ephemeral" in self.modes and self.args.launcher == "kubernetes") or self.chart:
            from pool.k8s.cluster import cluster_info

            env["kubernetes"] = cluster_info(self.args.kubeconfig or os.environ.get("KUBECONFIG"))
        return env

    def settings(self) -> dict[str, Any]:
        a = self.args
        return {
            "modes": self.modes, "workloads": self.workloads, "launcher": a.launcher, "concurrency": self.concurrency,
            "calls": a.calls, "slow_calls": a.slow_calls, "ephemeral_calls": a.ephemeral_calls,
            "ephemeral_max_in_flight": a.ephemeral_max_in_flight, "throughput_seconds": a.throughput_seconds,
            "payload_bytes": a.payload_bytes, "io_latency_ms": a.io_latency_ms, "stream_chunks": a.stream_chunks,
            "stream_chunk_ms": a.stream_chunk_ms, "scaling_in_flight": a.scaling_in_flight, "pool": a.pool,
            "pool_workers": a.pool_workers, "slots": a.slots, "scaling_workers": self.scaling,
            "llm": self.llm, "llm_latency_ms": a.llm_latency_ms, "llm_sigma": a.llm_sigma,
            "llm_tokens": a.llm_tokens, "llm_in_flight": self.llm_in_flight if self.llm else None,
            "llm_calls": self.llm_calls if self.llm else None,
            "chart": "/".join(self.chart) if self.chart else None,
        }


def _chart_release(text: str) -> tuple[str, str]:
    """``--chart NAMESPACE/RELEASE`` (or ``k8s://NAMESPACE/RELEASE``) -> (namespace, release)."""
    from pool.k8s.address import parse_k8s_address

    try:
        return parse_k8s_address(text if text.startswith("k8s://") else f"k8s://{text}")
    except ValueError:
        raise SystemExit(f"runnable-k8s bench: --chart {text!r}: expected NAMESPACE/RELEASE of an installed "
                         "worker-pool chart (`helm list -A` shows them)") from None


# Where the chart's warm figures were measured (``results["chart_warm"]``), as the ratios name them.
CHART_CLIENTS = {"client_pod": "chart_client_pod", "k8s_url": "chart_k8s_url"}


def summarize(results: dict[str, Any]) -> None:
    """Headline figures of each mode (from its first workload, echo when run) and the ratios."""
    in_process = results["in_process"]["workloads"]
    for figures in results["modes"].values():
        workloads = figures["workloads"]
        main = "echo" if "echo" in workloads else next(iter(workloads))
        head = workloads[main]
        figures.update({key: head[key] for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "calls")})
        figures["workload"] = main
        figures["throughput_per_s"] = head["throughput_per_s"]
        figures["throughput_by_concurrency"] = head["throughput_by_concurrency"]
        if "stream" in workloads:
            ttfc = workloads["stream"]["ttfc"]
            figures.update(ttfc_p50_ms=ttfc["p50_ms"], ttfc_p95_ms=ttfc["p95_ms"], ttfc_p99_ms=ttfc["p99_ms"])
        overhead = {}
        for name, w in workloads.items():
            base = in_process[name]["p50_ms"]
            overhead[name] = {"p50_ms_over_in_process": round(w["p50_ms"] - base, 4),
                              "p50_x_in_process": round(w["p50_ms"] / base, 2) if base > 0 else None}
            if name == "stream":
                base_first = in_process[name]["ttfc"]["p50_ms"]
                overhead[name]["ttfc_p50_ms_over_in_process"] = round(w["ttfc"]["p50_ms"] - base_first, 4)
        figures["overhead"] = overhead
        figures["overhead_ms"] = overhead[main]["p50_ms_over_in_process"]

    ratios: dict[str, Any] = {}
    modes = results["modes"]
    if "warm" in modes and "ephemeral" in modes:
        warm, eph = modes["warm"]["workloads"], modes["ephemeral"]["workloads"]
        ratios["ephemeral_p50_over_warm_p50"] = {name: round(eph[name]["p50_ms"] / warm[name]["p50_ms"], 1)
                                                 for name in warm if name in eph}
        if "stream" in warm and "stream" in eph:
            ratios["ephemeral_ttfc_over_warm_ttfc"] = round(eph["stream"]["ttfc"]["p50_ms"]
                                                            / warm["stream"]["ttfc"]["p50_ms"], 1)
        # The pool's own cost: what a call costs over the work itself (the io sleep, the stream's gaps).
        ratios["ephemeral_overhead_over_warm_overhead"] = {
            name: round(modes["ephemeral"]["overhead"][name]["p50_ms_over_in_process"]
                        / modes["warm"]["overhead"][name]["p50_ms_over_in_process"], 1)
            for name in warm if name in eph and modes["warm"]["overhead"][name]["p50_ms_over_in_process"] > 0}
    ratios.update(ephemeral_floor_ratios(modes.get("ephemeral", {})))
    ratios.update(chart_ratios(results))
    if "warm" in modes and "floor" in results and "echo" in modes["warm"]["workloads"]:
        warm_echo = modes["warm"]["workloads"]["echo"]
        floor_plus = results["floor"]["p50_ms"] + in_process["echo"]["p50_ms"]
        ratios["warm_p50_over_floor_plus_in_process"] = round(warm_echo["p50_ms"] / floor_plus, 3)
        ratios["warm_throughput_over_floor"] = round(
            warm_echo["throughput_per_s"] / results["floor"]["throughput_per_s"], 3)
        big = modes["warm"].get("big_runnable")
        if big:
            ratios["runnable_1mb_over_1kb_p50"] = big["p50_ratio_1mb_over_1kb"]
    results["ratios"] = ratios

    goals: dict[str, Any] = {}
    speedup = ratios.get("ephemeral_p50_over_warm_p50", {})
    launcher = modes.get("ephemeral", {}).get("launcher")
    if "echo" in speedup:
        target = 2000 if launcher == "kubernetes" else 500
        goals["warm_p50_speedup_over_ephemeral"] = {"workload": "echo", "launcher": launcher,
                                                    "measured": speedup["echo"], "goal": target,
                                                    "met": speedup["echo"] >= target}
    floor_goal = _ephemeral_floor_goal(ratios, launcher)
    if floor_goal is not None:
        goals["ephemeral_p50_over_its_floor"] = floor_goal
    scaling = results.get("scaling", {})
    if "1" in scaling.get("throughput_by_workers", {}) and "4" in scaling["throughput_by_workers"]:
        measured = round(scaling["throughput_by_workers"]["4"] / scaling["throughput_by_workers"]["1"], 3)
        goals["io_throughput_4_workers_over_1"] = {"measured": measured, "goal": 3.5, "met": measured >= 3.5}
    if "llm" in results:
        goals.update(llm.goals(results["llm"]))
    results["goals"] = goals


def chart_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """With ``--chart``: ephemeral p50 over the chart's warm p50 (client Pod, k8s://), per workload,
    and each chart path's warm p50 over the warm mode's (the local pool unless --pool)."""
    chart = results.get("chart_warm") or {}
    modes = results["modes"]
    ratios: dict[str, Any] = {}
    for where, name in CHART_CLIENTS.items():
        warm = (chart.get(where) or {}).get("workloads", {})
        for mode, key in (("ephemeral", f"ephemeral_p50_over_{name}_warm_p50"),
                          ("warm", f"{name}_warm_p50_over_warm_p50")):
            other = modes.get(mode, {}).get("workloads", {})
            found = {w: (other[w]["p50_ms"] / f["p50_ms"] if mode == "ephemeral" else f["p50_ms"] / other[w]["p50_ms"])
                     for w, f in warm.items() if w in other and f["p50_ms"] > 0 and other[w]["p50_ms"] > 0}
            if found:
                ratios[key] = {w: round(v, 1 if mode == "ephemeral" else 2) for w, v in found.items()}
    return ratios


# Ephemeral mode's goal: a call's p50 within 1.3 x its floor (a bare Python start locally, a minimal
# Pod's start on Kubernetes) measured in the same run, so a fresh worker per call costs little more
# than starting any process or Pod does.
EPHEMERAL_FLOOR_GOAL = 1.3


def ephemeral_floor_ratios(ephemeral: dict[str, Any]) -> dict[str, Any]:
    """Ephemeral p50 of each workload over each of its floors (``Bench.ephemeral_floor_probes``)."""
    floor, workloads = ephemeral.get("floor") or {}, ephemeral.get("workloads") or {}
    ratios: dict[str, Any] = {}
    for key, name in (("bare_start", "ephemeral_p50_over_bare_python_start"),
                      ("runnable_start", "ephemeral_p50_over_runnable_python_start"),
                      ("pod_start", "ephemeral_p50_over_minimal_pod_start")):
        if key in floor and floor[key]["p50_ms"] > 0:
            ratios[name] = {workload: round(w["p50_ms"] / floor[key]["p50_ms"], 2) for workload, w in workloads.items()}
    return ratios


def _ephemeral_floor_goal(ratios: dict[str, Any], launcher: str | None) -> dict[str, Any] | None:
    """Echo p50 over the floor it is held to: the bare start (local), the minimal Pod (kubernetes)."""
    key = ("ephemeral_p50_over_minimal_pod_start" if launcher == "kubernetes"
           else "ephemeral_p50_over_bare_python_start")
    by_workload = ratios.get(key, {})
    workload = "echo" if "echo" in by_workload else next(iter(by_workload), None)
    if workload is None:
        return None
    measured = by_workload[workload]
    return {"workload": workload, "launcher": launcher, "measured": measured, "goal": EPHEMERAL_FLOOR_GOAL,
            "compare": "<=", "met": measured <= EPHEMERAL_FLOOR_GOAL}


def run(args: argparse.Namespace) -> int:
    """The ``runnable-k8s bench`` entry point: measure, print the table, write JSON and PNG."""
    from pool.bench import report

    if args.soak is not None:
        return soak.run(args)
    if getattr(args, "ratios", False):
        from pool.bench import ratios

        return ratios.main(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before measuring for minutes, not after
        except ImportError:
            print("runnable-k8s bench: --plot needs matplotlib: pip install 'runnable-k8s[bench]'", file=sys.stderr)
            return 2
    if args.replot:
        with open(args.replot) as f:
            results = json.load(f)
        if results.get("kind") == "ratios":  # the JSON of a --ratios run: its own report
            from pool.bench import ratios

            print(ratios.format_report(results), flush=True)
            return 0
    else:
        results = Bench(args).run()
    print(report.format_table(results), flush=True)
    if args.json:
        report.write_json(results, args.json)
        print(f"[bench] wrote {args.json}", file=sys.stderr, flush=True)
    if args.plot and not results["in_process"]["workloads"]:
        print("[bench] --plot draws the echo/io/stream figures; the llm workload's are in the table and JSON only",
              file=sys.stderr, flush=True)
    elif args.plot:
        report.plot(results, args.plot)
        print(f"[bench] wrote {args.plot}", file=sys.stderr, flush=True)
    return 0

