"""The scaling signal a broker serves for KEDA and the HPA (``runnable_k8s_scaling_*`` on /metrics,
and GET /scaling), scraped from a real ``runnable-k8s broker`` process under load: it moves with
the load, it is the autoscaling policy's answer for the same numbers, and both forms agree."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda
from prometheus_client.parser import text_string_to_metric_families

from pool import LocalPool, RunnableK8s
from pool.scaling.policy import AutoscaleSettings, Load, PolicyState, decide, desired_workers
from tests.support.ports import free_port
from tests.support.waiting import wait_for


def wait_for_file(path: str) -> str:
    """A task that runs until the test creates ``path`` (the load stays put while it is measured)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "ok"


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return bytes(response.read())


def scaling_gauges(port: int) -> dict[str, float]:
    text = get(port, "/metrics").decode()
    return {s.name.removeprefix("runnable_k8s_scaling_"): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("runnable_k8s_scaling_")}


def one_tick(port: int) -> tuple[dict[str, Any], dict[str, float]]:
    """/scaling and /metrics from the same status snapshot: read /scaling on both sides of the
    scrape, and accept only when it did not change (a tick did not fall between them)."""
    while True:
        before = json.loads(get(port, "/scaling"))
        gauges = scaling_gauges(port)
        if json.loads(get(port, "/scaling")) == before:
            return before, gauges


def policy_answer(signal: dict[str, Any], settings: AutoscaleSettings) -> int:
    return desired_workers(Load(signal["queued"], signal["running"], signal["slots_per_worker"]), settings)


@pytest.mark.timeout(120)
def test_scaling_signal_moves_with_load_and_is_the_policys_answer(tmp_path: Path) -> None:
    port = free_port()
    settings = AutoscaleSettings(min=0, max=10, in_flight=8, target=0.5)
    flags = ["--metrics-port", str(port), "--autoscale-min", "0", "--autoscale-max", "10",
             "--autoscale-in-flight", "8", "--autoscale-target", "0.5", "--queue-timeout", "60"]
    gate = str(tmp_path / "go")
    with LocalPool(workers=0, slots=4, broker_args=flags) as pool:
        idle, idle_gauges = one_tick(port)
        assert idle["demand"] == 0 and idle["workers"] == 0
        assert idle["desired_workers"] == 0  # min 0 and nothing to do: zero workers
        assert idle["min_workers"] == 0 and idle["max_workers"] == 10
        assert idle_gauges["desired_workers"] == 0 and idle_gauges["demand"] == 0

        gated = RunnableK8s(bound=RunnableLambda(wait_for_file), pool=pool.address, mode="warm", timeout=90)
        results: list[Any] = []
        caller = threading.Thread(target=lambda: results.extend(
            gated.batch([gate] * 10, config={"max_concurrency": 10})))
        caller.start()
        try:
            # No worker yet: ten calls queued ask for workers (scale from zero), dividing by
            # in-flight 8 x 0.5 (a worker's slots are not known yet: the worker's default, more).
            queued = wait_for(lambda: (s := one_tick(port))[0]["demand"] == 10 and s, 30, "10 queued calls")
            signal, gauges = queued
            assert signal["queued"] == 10 and signal["running"] == 0 and signal["workers"] == 0
            assert signal["target_per_worker"] == 4.0
            assert signal["desired_workers"] == 3 == policy_answer(signal, settings)
            assert gauges == {"demand": 10, "desired_workers": 3, "target_per_worker": 4.0,
                              "min_workers": 0, "max_workers": 10}

            # One worker of 4 slots takes calls (a sub-batch in a slot runs its calls); the rest
            # wait. The policy now divides by min(8, 4) x 0.5 = 2.
            pool.scale(1)
            signal, gauges = wait_for(lambda: (s := one_tick(port))[0]["running"] > 0 and s, 30,
                                      "calls running on the worker")
            assert signal["queued"] + signal["running"] == signal["demand"] == 10 and signal["workers"] == 1
            assert signal["slots_per_worker"] == 4 and signal["target_per_worker"] == 2.0
            assert signal["desired_workers"] == 5 == policy_answer(signal, settings)
            assert gauges["demand"] == 10 and gauges["desired_workers"] == 5 and gauges["target_per_worker"] == 2.0
        finally:
            Path(gate).touch()
            caller.join(60)
        assert results == ["ok"] * 10

        # Done: no demand, zero workers wanted (the idle delay is the scaler's, e.g. KEDA's cooldownPeriod).
        signal, gauges = wait_for(lambda: (s := one_tick(port))[0]["demand"] == 0 and s, 30, "the load to end")
        assert signal["desired_workers"] == 0 and gauges["desired_workers"] == 0
        assert signal["slots_per_worker"] == 4  # learnt from the worker, kept


def test_desired_workers_is_the_recommendation_of_decide() -> None:
    """The gauge is rules 1 and 2 of the policy: the same number ``decide`` recommends, for every
    load, whenever the idle delay is not in play (there is load, or min > 0)."""
    for settings in (AutoscaleSettings(min=1, max=10), AutoscaleSettings(min=0, max=4, in_flight=8, target=0.5),
                     AutoscaleSettings(min=2, max=3, in_flight=1, target=2.0)):
        for slots in (1, 4, 256):
            for queued in (0, 1, 5, 63, 64, 65, 500):
                for running in (0, 1, 4, 100):
                    load = Load(queued, running, slots)
                    if settings.min == 0 and load.tasks == 0:
                        assert desired_workers(load, settings) == 0
                        continue
                    decision, _ = decide(load, replicas=1, settings=settings, state=PolicyState(), now=0.0)
                    assert desired_workers(load, settings) == decision.recommendation, (settings, load)
