"""``runnable-k8s bench --ratios``: every goal's figure, computed right, with its in-process reference.

No timed assertions: the goals' verdicts depend on the machine. What is checked is that each
goal's ratio is computed from the right figures (synthetic runs, exact numbers), that the
broker's per-token cost is the slope between two runs, that the per-process CPU meter reads a real
process's CPU, and that a tiny real run reports every run with its in-process reference and each
process's CPU per call, every goal, and leaves no process behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import child_pids
from tests.support.waiting import wait_for


def _pair(warm_rate: float, in_rate: float, warm_client: float, in_client: float,
          warm_ttft: float | None = None, in_ttft: float | None = None) -> dict:
    warm = {"throughput_per_s": warm_rate, "cpu_us_per_call": {"client": warm_client, "broker": 9.0}}
    in_process = {"throughput_per_s": in_rate, "cpu_us_per_call": {"client": in_client}}
    if warm_ttft is not None:
        warm["ttft"], in_process["ttft"] = {"p50_ms": warm_ttft}, {"p50_ms": in_ttft}
    return {"warm": warm, "in_process": in_process}


SYNTHETIC = {
    "io": _pair(warm_rate=3000, in_rate=6000, warm_client=100, in_client=400),
    "stream": _pair(warm_rate=500, in_rate=1000, warm_client=900, in_client=1000, warm_ttft=1.3, in_ttft=1.0),
    "llm_100": {"ratios": {"p50_warm_over_in_process": 1.05}},
    "llm_1000": {"ratios": {"p50_warm_over_in_process": 1.31}},
    "echo": {"in_process": {"latency": {"p50_ms": 0.1}},
             "floor": {"latency": {"p50_ms": 0.4}, "throughput": {"throughput_per_s": 10000}},
             "warm": {"latency": {"p50_ms": 0.75}, "throughput": {"throughput_per_s": 3500}}},
    "tokens": {"broker_us_per_token_short": 6.0, "broker_us_per_token_marginal": 4.5},
    "capacity": {"relayed_tokens_per_s_per_broker_core": 150_000},
}


def test_each_goal_is_computed_from_the_right_figures() -> None:
    from pool.bench.ratios import GOALS, goals

    found = goals(SYNTHETIC)
    assert set(found) == set(GOALS)
    expected = {
        "io_calls_per_s_over_in_process": (0.5, False), "io_caller_cpu_over_in_process": (0.25, True),
        "stream_calls_per_s_over_in_process": (0.5, None), "stream_caller_cpu_over_in_process": (0.9, False),
        "stream_ttft_p50_over_in_process": (1.3, False),
        "llm_100_p50_over_in_process": (1.05, True), "llm_1000_p50_over_in_process": (1.31, False),
        "echo_p50_over_floor_plus_in_process": (1.5, True),  # 0.75 / (0.4 + 0.1): the bound itself is met
        "echo_throughput_64_over_floor": (0.35, True),
        "broker_us_per_token": (6.0, False), "broker_us_per_token_marginal": (4.5, True),
        "broker_tokens_per_s_per_core": (150_000, False),
    }
    for name, (value, met) in expected.items():
        assert found[name]["measured"] == pytest.approx(value), name
        assert found[name]["met"] is met, (name, found[name])
    assert found["io_caller_cpu_over_in_process"]["goal"] == 0.5
    assert found["echo_throughput_64_over_floor"]["compare"] == ">="


def test_a_missing_run_is_not_measured_rather_than_met() -> None:
    from pool.bench.ratios import goals

    found = goals({"io": SYNTHETIC["io"]})
    assert found["io_caller_cpu_over_in_process"]["met"] is True
    assert found["stream_ttft_p50_over_in_process"] == {**found["stream_ttft_p50_over_in_process"],
                                                        "measured": None, "met": None}
    zero = goals({"io": _pair(warm_rate=1, in_rate=0, warm_client=1, in_client=0)})  # no division by zero
    assert zero["io_calls_per_s_over_in_process"]["measured"] is None


def test_broker_cost_per_token_is_per_call_and_the_slope() -> None:
    from pool.bench.tokens import token_costs

    short = {"cpu_us_per_call": {"broker": 300.0}, "chunks_per_call": 20}
    long = {"cpu_us_per_call": {"broker": 1200.0}, "chunks_per_call": 200}
    costs = token_costs(short, long, stream_rate=50)
    assert costs["broker_us_per_token_short"] == 15.0 and costs["broker_us_per_token_long"] == 6.0
    assert costs["broker_us_per_token_marginal"] == 5.0  # (1200 - 300) / 180: the fixed cost cancels
    assert costs["tokens_per_s_per_broker_core"] == 200_000 and costs["streams_per_broker_core"] == 4000
    assert "broker_us_per_token_marginal" not in token_costs(short, {"cpu_us_per_call": {}, "chunks_per_call": 200})


@pytest.mark.timeout(30)
def test_cpu_meter_reads_another_process() -> None:
    from pool.bench.cpu import CpuMeter, cpu_seconds, per_call_us, pool_processes

    spin = ("import sys, time\nsys.stdin.readline()\nstart = time.process_time()\n"
            "while time.process_time() - start < 0.3: pass\nprint('done', flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdin is not None and child.stdout is not None
        meter = CpuMeter({"spinner": child.pid, **pool_processes(None)}).start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        used = meter.stop()
    finally:
        child.kill()
        child.wait(10)
    assert used["cpu_s"]["spinner"] >= 0.25  # it spun 0.3 s of CPU; /proc counts in 10 ms ticks
    assert used["cpu_s"]["client"] is not None and used["wall_s"] > 0
    assert cpu_seconds(child.pid) is None  # gone (reaped): unreadable, not zero
    row = per_call_us({"client": 0.001, "broker": 0.002, "worker-1": 0.003, "worker-2": None}, 10)
    assert row == {"client": 100.0, "broker": 200.0, "worker-1": 300.0, "worker-2": None, "workers": 300.0,
                   "total": 600.0}


@pytest.mark.timeout(120)
def test_tiny_ratios_run_reports_every_goal_with_its_reference(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pool.bench.ratios import GOALS, goals
    from pool.cli import main

    before = child_pids()
    path = tmp_path / "ratios.json"
    assert main(["bench", "--ratios", "--ratios-scale", "0.02", "--io-latency-ms", "5", "--llm-latency-ms", "20",
                 "--llm-tokens", "5", "--calls", "200", "--floor-tasks", "2000", "--no-progress",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    results = json.loads(path.read_text())
    runs = results["runs"]
    for name in ("io", "stream", "llm_100", "llm_1000"):
        for side in ("in_process", "warm"):
            run = runs[name][side]
            assert run["completed"] == run["calls"] and run["errors"] == 0, (name, side, run)
            assert run["cpu_us_per_call"]["client"] is not None, (name, side)
            assert run["load_1m"] >= 0, (name, side)  # each side's load, to judge the ratio on a shared machine
        assert "broker" not in runs[name]["in_process"]["cpu_us_per_call"]  # the reference is this process
        assert runs[name]["order"] == "ABBA", name  # in-process, pool, pool, in-process: a load drift hits both
        assert {"broker", "worker-1", "worker-2"} <= set(runs[name]["warm"]["cpu_us_per_call"]), name
    assert runs["io"]["warm"]["call"] == "ainvoke" and runs["stream"]["warm"]["call"] == "astream"
    assert runs["stream"]["warm"]["chunks_per_call"] == 20 and runs["stream"]["in_process"]["ttft"]["p50_ms"] > 0
    echo = runs["echo"]
    assert echo["floor"]["latency"]["p50_ms"] > 0 and echo["in_process"]["latency"]["p50_ms"] > 0
    assert echo["floor"]["throughput"]["in_flight"] == echo["warm"]["throughput"]["in_flight"] == 64
    assert runs["tokens"]["short"]["chunks_per_call"] == 20 and runs["tokens"]["long"]["chunks_per_call"] == 200
    assert runs["capacity"]["relayed_tokens_per_s"] > 0 and "broker" in runs["capacity"]["run"]["cores_busy"]
    assert set(results["goals"]) == set(GOALS)
    assert results["goals"] == json.loads(json.dumps(goals(runs)))  # the verdicts are those of the figures
    assert all(g["measured"] is not None for g in results["goals"].values()), results["goals"]
    for goal in results["goals"].values():
        assert goal["what"] in out
    for text in ("ratios (each goal", "CPU us per call", "bare ZeroMQ floor", "marginal", "streams in flight"):
        assert text in out, text
    assert main(["bench", "--replot", str(path)]) == 0  # a --ratios JSON replots as its own report
    assert capsys.readouterr().out.strip() == out.strip()
    wait_for(lambda: child_pids() <= before, 10, "the ratios run's pool and floor to exit")
