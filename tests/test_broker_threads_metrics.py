"""Threads and hedges in Prometheus: the four counters (``_total``) and the two gauges, scraped
over HTTP from a broker whose core was driven by hand (no workers or clients needed)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pool.broker import events as E
from pool.broker.metrics import BrokerMetrics
from pool.broker.server import Broker
from tests.support.broker_core import CLIENT, RUNNABLE, Pool, new_id, tasks_sent
from worker import protocol as P
from worker.codec import digest


def submit(pool: Pool, task_id: bytes, *, affinity: str | None = None, hedge_of: bytes | None = None) -> list[E.Effect]:
    header = P.TaskHeader("invoke", digest(RUNNABLE), affinity=affinity,
                          hedge_of=hedge_of.hex() if hedge_of is not None else None).to_bytes()
    return pool(E.Submit(CLIENT, task_id, header, RUNNABLE, b"input"))


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


@pytest.mark.timeout(30)
def test_threads_and_hedges_are_counted_in_prometheus():
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    metrics = None
    try:
        pool = Pool()
        pool.core = broker.core  # the broker's own core, driven without sockets
        pool.hello()
        pool.ready(b"w1", slots=1)
        pool.ready(b"w2", slots=1)
        first = new_id()
        ((holder, _),) = tasks_sent(submit(pool, first, affinity="t1"))
        submit(pool, new_id(), affinity="t1")  # waits for its holder
        submit(pool, new_id(), hedge_of=first)  # a thread's task: never hedged
        plain = new_id()
        submit(pool, plain)  # on the other worker
        pool.result(holder, first)  # the waiting one runs now
        other = b"w2" if holder == b"w1" else b"w1"
        pool.ready(b"w3", slots=1)
        submit(pool, new_id(), hedge_of=plain)  # runs on w3
        metrics = BrokerMetrics(broker).attach()  # (its gauges: the status taken now)
        port = metrics.serve(0)
        samples = scrape(port)
        assert samples["runnable_k8s_threads_pinned_total"] == 1
        assert samples["runnable_k8s_hedges_sent_total"] == 1
        assert samples["runnable_k8s_hedges_refused_total"] == 1
        assert samples["runnable_k8s_threads_lost_total"] == 0
        assert samples["runnable_k8s_threads_held"] == 1
        assert samples["runnable_k8s_queue_pinned"] == 0
        pool(E.Bye(holder))
        pool(E.Bye(other))
        metrics._take_status(broker.status())  # what the next tick does
        samples = scrape(port)
        assert samples["runnable_k8s_threads_lost_total"] == 1  # the task that ran on the holder
        assert samples["runnable_k8s_threads_held"] == 0
    finally:
        if metrics is not None:
            metrics.close()
        broker.close()
