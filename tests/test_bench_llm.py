"""runnable-k8s bench --workload llm: a tiny real run (in-process reference + a LocalPool), checked for shape.

No timed assertions: what is checked is that the fake chat model is a real LangChain chat model,
deterministic per input, that it crosses to a worker, and that the run reports calls/s, end-to-end
latency and time to first token for both the pool and the in-process reference, with their ratios
and the workload's goals (p50 within 1.1 x in-process, first token within 5 ms of it); and that no
process is left behind.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, HumanMessage

from tests.support.processes import child_pids
from tests.support.waiting import wait_for

TINY_LLM = ["--workload", "llm", "--llm-calls", "20", "--llm-in-flight", "10", "--llm-latency-ms", "10",
            "--llm-tokens", "5", "--no-progress"]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_fake_model_is_a_chat_model_deterministic_per_input() -> None:
    from pool.bench.fake_llm import FakeLatencyChatModel, build

    model = build(median_ms=5, tokens=4, sigma=0.5)
    assert isinstance(model, BaseChatModel) and isinstance(model, FakeLatencyChatModel)
    a, b = [HumanMessage("one")], [HumanMessage("two")]
    assert model.latency_s(a) == model.latency_s(a) == build(median_ms=5, tokens=4).latency_s(a)
    assert model.latency_s(a) != model.latency_s(b)
    assert build(median_ms=5, sigma=0).latency_s(a) == pytest.approx(0.005)

    async def stream() -> list[AIMessageChunk]:
        return [chunk async for chunk in model.astream("one")]

    chunks = [c for c in asyncio.run(stream()) if c.content]
    assert [c.content for c in chunks] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert model.invoke("one").content == "tok0 tok1 tok2 tok3 "


@pytest.mark.timeout(120)
def test_llm_workload_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pool.cli import main

    before = child_pids()
    assert main(["bench", *TINY_LLM, "--json", str(tmp_path / "llm.json")]) == 0
    out = capsys.readouterr().out
    for text in ("llm workload", "in-process (one loop)", "TTFT p50", "llm p50 over in process", "CPU us per call"):
        assert text in out, text
    results = json.loads((tmp_path / "llm.json").read_text())
    figures = results["llm"]
    assert figures["in_flight"] == 10 and figures["calls"] == 20
    assert figures["settings"] == {"latency_ms": 10.0, "sigma": 0.5, "tokens": 5,
                                   "model": "FakeLatencyChatModel", "call": "astream"}
    for run in ("in_process", "warm"):
        r = figures[run]
        assert r["completed"] == 20 and r["errors"] == 0, r
        assert _positive(r["throughput_per_s"]) and _positive(r["process_cpu_ms_per_call"])
        for key in ("end_to_end", "ttft"):
            assert all(_positive(r[key][q]) for q in ("p50_ms", "p95_ms", "p99_ms")), (run, key, r[key])
            assert r[key]["calls"] == 20
        assert r["ttft"]["p50_ms"] <= r["end_to_end"]["p50_ms"]
        assert "client" in r["cpu_us_per_call"] and "client" in r["cores_busy"]
    assert {"broker", "worker-1", "workers"} <= set(figures["warm"]["cpu_us_per_call"])  # each process of the pool
    assert "broker" not in figures["in_process"]["cpu_us_per_call"]
    assert figures["pool"]["local"] is True
    ratios = figures["ratios"]
    assert _positive(ratios["throughput_warm_over_in_process"]) and _positive(ratios["p50_warm_over_in_process"])
    assert "ttft_p50_ms_over_in_process" in ratios
    assert {"llm_p50_over_in_process", "llm_ttft_p50_ms_over_in_process"} <= set(results["goals"])
    assert results["goals"]["llm_p50_over_in_process"]["goal"] == 1.05  # 10 in flight: the 100-in-flight goal
    assert results["modes"] == {} and "floor" not in results  # llm alone: no echo/io/stream figures
    wait_for(lambda: child_pids() <= before, 10, "the llm run's pool to exit")


@pytest.mark.timeout(180)
def test_llm_next_to_the_other_workloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--workload echo,llm``: the usual table plus the llm section; llm takes the highest --in-flight."""
    from pool.cli import main

    code = main(["bench", "--modes", "warm", "--workload", "echo,llm", "--calls", "20", "--in-flight", "1,4",
                 "--throughput-seconds", "0.3", "--floor-tasks", "200", "--workers", "0", "--no-big-runnable",
                 "--llm-calls", "12", "--llm-latency-ms", "10", "--llm-tokens", "3", "--no-progress",
                 "--json", str(tmp_path / "both.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "bare pyzmq floor" in out and "llm workload" in out
    results = json.loads((tmp_path / "both.json").read_text())
    assert set(results["modes"]["warm"]["workloads"]) == {"echo"}
    assert results["llm"]["in_flight"] == 4 and results["llm"]["warm"]["completed"] == 12
