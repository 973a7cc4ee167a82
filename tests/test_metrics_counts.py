"""What the four operator series count: the queue wait (SUBMIT to dispatch), the errors sent by
code, the builtin autoscaler's own changes, and the memory limit the broker sized itself from.

The counting is checked in the broker's core, event by event (tests/support/broker_core.py: no
socket, no clock), and its exposition through a broker's real metrics collector, parsed as
Prometheus parses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pool.broker import events as E
from pool.broker.metrics import BrokerMetrics
from pool.broker.server import Broker
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings, Load
from tests.support.broker_core import CLIENT, Pool, errors_sent, new_id, tasks_sent
from tests.support.scale_stand_in import Deployment
from worker import protocol as P
from worker.memory_limit import memory_limit as cgroup_memory_limit


@pytest.fixture
def pool() -> Pool:
    pool = Pool(queue_timeout=10.0)
    pool.hello()
    return pool


def samples(metrics: BrokerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------- queue wait


def test_queue_wait_is_observed_at_dispatch_as_seconds_since_submit(pool):
    first, second = new_id(), new_id()
    pool.at(1.0).submit(first)
    pool.at(1.5).submit(second)
    assert pool.core.queue_wait.count == 0  # queued, not dispatched: nothing observed yet
    pool.at(4.0).ready(b"w1", slots=1)  # first waited 3 s
    pool.at(4.2).result(b"w1", first)  # its slot goes to second, which waited 2.7 s
    histogram = pool.core.queue_wait
    assert histogram.count == 2
    assert histogram.sum == pytest.approx(3.0 + 2.7)
    buckets = dict(histogram.cumulative())
    assert buckets["2.5"] == 0 and buckets["5.0"] == 2


def test_a_task_that_times_out_in_the_queue_is_not_a_queue_wait_observation(pool):
    pool.submit(task_id := new_id(), timeout=1.0)
    assert errors_sent(pool.tick(2.0)) == [(CLIENT, task_id, P.E_QUEUE_TIMEOUT)]
    assert pool.core.queue_wait.count == 0  # counted as an error by code instead
    assert pool.core.errors_by_code[P.E_QUEUE_TIMEOUT] == 1


def test_a_task_dispatched_at_once_waits_zero(pool):
    pool.ready(b"w1", slots=1)
    pool.at(0.0)
    assert tasks_sent(pool.submit(new_id()))
    assert pool.core.queue_wait.count == 1 and pool.core.queue_wait.sum == 0.0


# ---------------------------------------------------------------------------- errors by code


def test_errors_are_counted_by_code_the_brokers_own_and_the_workers_it_relays(pool):
    pool.ready(b"w1", slots=2)
    failing, odd = new_id(), new_id()
    pool.submit(failing)
    pool.submit(odd)
    assert errors_sent(pool.error(b"w1", failing, P.E_REMOTE)) == [(CLIENT, failing, P.E_REMOTE)]
    # A code this broker does not know (a worker of another version): relayed, counted as "other".
    assert errors_sent(pool.error(b"w1", odd, b"made-up-by-a-newer-worker")) == [
        (CLIENT, odd, b"made-up-by-a-newer-worker")]
    pool.submit(bad := new_id(), runnable=b"x", send_bytes=False)  # a runnable the store never had
    counts = pool.core.errors_by_code
    assert counts[P.E_REMOTE] == 1
    assert counts[b"other"] == 1
    assert b"made-up-by-a-newer-worker" not in counts  # the label's values stay bounded
    assert sum(counts.values()) == 2, "need-runnable is a protocol step, not an error"
    del bad


def test_busy_is_not_an_error_code_and_queue_full_is():
    pool = Pool(queue_size=1, client_queue_bytes=3000)
    pool.hello()
    pool.submit(new_id())
    assert errors_sent(pool.submit(busy := new_id()))[0][1:] == (busy, P.E_BUSY)  # backpressure: sent again
    assert errors_sent(pool.submit(big := new_id(), input_blob=b"x" * 3500))[0][1:] == (big, P.E_QUEUE_FULL)
    assert pool.core.errors_by_code[P.E_QUEUE_FULL] == 1
    assert P.E_BUSY not in pool.core.errors_by_code and sum(pool.core.errors_by_code.values()) == 1


def test_a_lost_worker_s_task_counts_worker_lost(pool):
    pool.ready(b"w1")
    pool.submit(task_id := new_id())
    pool.at(2.0).hello()
    assert errors_sent(pool.at(3.5)(E.Tick())) == [(CLIENT, task_id, P.E_WORKER_LOST)]
    assert pool.core.errors_by_code[P.E_WORKER_LOST] == 1


# ---------------------------------------------------------------------------- exposition


@pytest.fixture
def broker():
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    yield broker
    broker.close()


def test_the_autoscalers_changes_and_replicas_are_exported(broker):
    autoscaler = Autoscaler(AutoscaleSettings(min=0, max=8, in_flight=4, window=0, idle=0), Deployment(1),
                            resync=0, clock=lambda: 0.0)
    metrics = BrokerMetrics(broker, autoscaler=autoscaler).attach()
    before = samples(metrics)
    assert before[("runnable_k8s_autoscaler_scale_total", (("direction", "up"),))] == 0
    assert ("runnable_k8s_autoscaler_replicas", ()) not in before  # it has set nothing yet
    autoscaler.step(Load(queued=20, running=0, slots_per_worker=4), now=1.0)  # 20 / 4 = 5 workers
    autoscaler.step(Load(queued=0, running=8, slots_per_worker=4), now=2.0)  # window 0: down to 2
    autoscaler.step(Load(queued=0, running=8, slots_per_worker=4), now=3.0)  # no change: not counted
    after = samples(metrics)
    assert after[("runnable_k8s_autoscaler_scale_total", (("direction", "up"),))] == 1
    assert after[("runnable_k8s_autoscaler_scale_total", (("direction", "down"),))] == 1
    assert after[("runnable_k8s_autoscaler_replicas", ())] == 2
    assert [(frm, to) for _, frm, to, _ in autoscaler.history] == [(1, 5), (5, 2)]


def test_no_autoscaler_series_without_the_builtin_autoscaler(broker):
    names = {name for name, _ in samples(BrokerMetrics(broker).attach())}
    assert not any(name.startswith("runnable_k8s_autoscaler_") for name in names)


def test_the_memory_limit_is_the_one_the_broker_was_given(broker):
    assert samples(BrokerMetrics(broker, memory_limit=512 * 2**20).attach())[("runnable_k8s_memory_limit_bytes", ())] \
        == 512 * 2**20


def test_the_cgroup_limit_is_read_and_unlimited_is_none(tmp_path: Path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("1073741824\n")
    assert cgroup_memory_limit((str(v2),)) == 2**30
    v2.write_text("max\n")
    assert cgroup_memory_limit((str(v2), str(v1))) is None
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "no limit"
    assert cgroup_memory_limit((str(tmp_path / "absent"), str(v1))) is None
    assert cgroup_memory_limit((str(tmp_path / "absent"),)) is None


def test_queue_wait_and_errors_by_code_are_exported_with_bounded_labels(broker):
    metrics = BrokerMetrics(broker).attach()
    broker.core.queue_wait.observe(0.3)
    broker.core._count_error(P.E_QUEUE_TIMEOUT)
    broker.core._count_error(b"\xff" * 40)  # any code: one label value, "other"
    got = samples(metrics)
    assert got[("runnable_k8s_queue_wait_seconds_count", ())] == 1
    assert got[("runnable_k8s_queue_wait_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("runnable_k8s_task_errors_total", (("code", "queue-timeout"),))] == 1
    assert got[("runnable_k8s_task_errors_total", (("code", "other"),))] == 1
    codes = {dict(labels)["code"] for name, labels in got if name == "runnable_k8s_task_errors_total"}
    assert codes == {"remote", "worker-lost", "timeout", "queue-timeout", "queue-full", "incompatible",
                     "payload-too-large", "serialization", "bad-request", "unauthorized", "thread-lost", "other"}
