"""The broker's Prometheus metrics, scraped over HTTP from a real broker process
(docs/design.md#scaling-and-losing-peers)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda
from prometheus_client.parser import text_string_to_metric_families

from pool import LocalPool, RunnableK8s
from pool.broker.metrics import BrokerMetrics
from pool.broker.server import Broker
from tests.support.ports import free_port


def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "ok"


def boom(_: Any) -> None:
    raise ValueError("boom")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def eventually(port: int, check: Callable[[dict], bool], timeout: float = 10.0) -> dict:
    """Gauges follow the broker's 1 s tick: scrape until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_metrics_count_tasks_by_outcome_latency_slots_and_workers() -> None:
    port = free_port()
    with LocalPool(workers=2, slots=3, broker_args=["--metrics-port", str(port)]) as pool:
        ok = RunnableK8s(bound=RunnableLambda(slow), pool=pool.address, mode="warm", timeout=30)
        bad = RunnableK8s(bound=RunnableLambda(boom), pool=pool.address, mode="warm", timeout=30)
        assert ok.batch([0.0] * 4 + [0.2]) == ["ok"] * 5
        for _ in range(2):
            with pytest.raises(ValueError, match="boom"):  # the remote exception, re-raised here
                bad.invoke(None)

        samples = eventually(port, lambda s: value(s, "runnable_k8s_slots_free") == 6)
        assert value(samples, "runnable_k8s_tasks_total", outcome="submitted") == 7
        assert value(samples, "runnable_k8s_tasks_total", outcome="done") == 5
        assert value(samples, "runnable_k8s_tasks_total", outcome="failed") == 2
        assert value(samples, "runnable_k8s_tasks_total", outcome="cancelled") == 0
        assert value(samples, "runnable_k8s_workers") == 2
        assert value(samples, "runnable_k8s_workers_draining") == 0
        assert value(samples, "runnable_k8s_slots") == 6
        assert value(samples, "runnable_k8s_slots_free") == 6
        assert value(samples, "runnable_k8s_slots_busy") == 0
        assert value(samples, "runnable_k8s_queue_depth") == 0
        # The histogram holds the 5 results (submit to result), one of them at least 0.2 s.
        assert value(samples, "runnable_k8s_task_latency_seconds_count") == 5
        assert value(samples, "runnable_k8s_task_latency_seconds_bucket", le="+Inf") == 5
        assert value(samples, "runnable_k8s_task_latency_seconds_bucket", le="0.1") <= 4  # not the 0.2 s one
        assert value(samples, "runnable_k8s_task_latency_seconds_bucket", le="300.0") == 5
        assert value(samples, "runnable_k8s_task_latency_seconds_sum") >= 0.2
        # The same numbers as `runnable-k8s status`.
        status = pool.status()
        assert status["counters"]["done"] == 5 and status["slots"] == 6 and len(status["workers"]) == 2

        # Busy slots and queue depth while tasks run: 6 slots, 8 slow tasks.
        thread = threading.Thread(target=ok.batch, args=([2.0] * 8,), kwargs={"config": {"max_concurrency": 8}})
        thread.start()
        busy = eventually(port, lambda s: value(s, "runnable_k8s_slots_busy") == 6
                          and value(s, "runnable_k8s_queue_depth") == 2)
        assert value(busy, "runnable_k8s_slots_busy") == 6
        assert value(busy, "runnable_k8s_slots_free") == 0
        assert value(busy, "runnable_k8s_queue_depth") == 2
        assert value(busy, "runnable_k8s_held_bytes") > 0  # the 8 tasks' inputs, held until they end
        assert value(busy, "runnable_k8s_worker_input_bytes") > 0  # the 6 running ones' inputs
        assert value(busy, "runnable_k8s_runnable_store_bytes") > 0
        thread.join(30)
        after = eventually(port, lambda s: value(s, "runnable_k8s_tasks_total", outcome="done") == 13)
        assert value(after, "runnable_k8s_task_latency_seconds_count") == 13
        assert eventually(port, lambda s: value(s, "runnable_k8s_held_bytes") == 0)
        assert value(after, "runnable_k8s_clients_dropped_total") == 0
        assert value(after, "runnable_k8s_unread_bytes") == 0
        # Well-behaved peers: nothing refused for its sender, no routing id taken over.
        assert value(after, "runnable_k8s_messages_refused_total") == 0
        assert value(after, "runnable_k8s_peers_replaced_total") == 0
        finished = eventually(port, lambda s: value(s, "runnable_k8s_worker_input_bytes") == 0)
        assert value(finished, "runnable_k8s_worker_input_bytes") == 0  # no task holds a worker's budget


@pytest.mark.timeout(20)
def test_metrics_listen_on_loopback_by_default() -> None:
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    metrics = BrokerMetrics(broker).attach()
    try:
        port = metrics.serve(0)
        assert metrics._server.server_address[0] == "127.0.0.1"
        samples = scrape(port)
        assert value(samples, "runnable_k8s_workers") == 0
        assert value(samples, "runnable_k8s_task_latency_seconds_count") == 0
        for name in ("busy", "messages_refused", "peers_replaced", "connections_cut", "connections_closed"):
            assert value(samples, f"runnable_k8s_{name}_total") == 0
    finally:
        metrics.close()
        broker.close()
