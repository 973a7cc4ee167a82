"""Prometheus metrics of a broker (docs/design.md#scaling-and-losing-peers): the numbers ``runnable-k8s status``
prints, and the scaling signal an HPA or KEDA scales the workers on.

    runnable-k8s broker ... --metrics-port 9090 [--metrics-bind 0.0.0.0] [--autoscale-in-flight 64 ...]
    curl -s 127.0.0.1:9090/metrics | grep runnable_k8s_
    curl -s 127.0.0.1:9090/scaling      # {"demand": 12, "desired_workers": 1, ...}: KEDA's metrics-api

Gauges come from the broker's status snapshot, refreshed every tick (1 s) on the broker's own
thread, so a scrape never touches the loop's state while it changes; task counters are read live;
the latency histogram is fed at each RESULT through the broker's ``latency_hook`` with a few
hundred nanoseconds of work (a bisect and two additions, no lock). The queue wait (SUBMIT to
dispatch) and the errors by code are kept by the core itself (``CoreState.queue_wait``,
``errors_by_code``), where the dispatch and the ERROR happen; the builtin autoscaler's changes are
its own (``Autoscaler.scaled``, ``replicas_set``), read when it is passed in.

The scaling signal is the autoscaling policy's own arithmetic (``pool.scaling.policy``) over the
same snapshot, with the same settings (the ``--autoscale-*`` flags), whether or not the broker's
autoscaler is on: ``runnable_k8s_scaling_desired_workers`` is what the builtin autoscaler would
recommend for this load (before its idle delay and scale-down window, which KEDA and the HPA
keep themselves), and ``runnable_k8s_scaling_demand`` is what it divides.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from pool.broker import metrics_http
from pool.broker.core_state import ERROR_CODES, OTHER_ERROR
from pool.broker.histogram import SECONDS_BUCKETS, Histogram
from pool.scaling.policy import AutoscaleSettings, Load, desired_workers, slots_per_worker_of, target_per_worker
from worker import defaults
from worker.command_line import DISTRIBUTION
from worker.memory_limit import memory_limit as cgroup_memory_limit
from worker.protocol import PROTOCOL

if TYPE_CHECKING:
    from pool.broker.server import Broker
    from pool.scaling.autoscaler import Autoscaler

PREFIX = "runnable_k8s"
# Seconds from SUBMIT to RESULT (and to dispatch, for the queue wait).
LATENCY_BUCKETS = SECONDS_BUCKETS
# The only label values: bounded, known here (never an id, a key, a digest).
TASK_OUTCOMES = ("submitted", "done", "failed", "cancelled", "retried")
ERROR_CODE_LABELS = tuple(code.decode() for code in (*ERROR_CODES, OTHER_ERROR))
AUTOSCALER_DIRECTIONS = ("up", "down")
# Counters of who sent what (pool.broker.core.COUNTERS); a rising messages_refused or
# peers_replaced is a peer probing the pool, or a misconfigured key.
_IDENTITY_COUNTERS = (
    ("busy", "Tasks answered 'busy': their client key's or the broker's allowance was full, they are sent again."),
    ("messages_refused", "Messages not acted on because of their sender: the other role's command, a revoked "
                         "key, a reply or CANCEL for a task that is not the sender's."),
    ("peers_replaced", "Peers dropped because another connection or key used their routing id."),
    ("connections_cut", "Connections the broker closed (a revoked or unknown key)."),
    ("connections_closed", "Connections that closed (seen by the broker's socket monitor)."),
    ("rule_errors", "Messages whose rule raised: a bug of the broker, not of the peer (its log has the traceback)."),
    ("replies_packed", "REPLIES messages received from workers (each carries several replies of its tasks)."),
    ("entries_relayed", "Replies (streamed chunks, callback events, results) that arrived packed in REPLIES."),
    ("threads_pinned", "Tasks of a thread sent (or queued) to the worker that holds the thread."),
    ("threads_lost", "Tasks answered 'thread lost': the worker holding their thread's checkpoint in memory is gone."),
    ("hedges_sent", "Hedges (duplicates of a slow task) started on another worker."),
    ("hedges_refused", "Hedges not run: the original was queued, had streamed, or no other worker was free."),
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree never installed
        return "unknown"


_VERSION = _version()


LatencyHistogram = Histogram  # the name other modules import


class BrokerMetrics:
    """A Prometheus collector over one broker; ``attach`` it, then ``serve`` it over HTTP.

    Args:
        scaling: the autoscaling settings the scaling signal uses (the broker's ``--autoscale-*``
            flags); the defaults when None, as the builtin autoscaler's.
        memory_limit: the bytes the broker sized its budgets from (``--memory-limit``), exported as
            ``runnable_k8s_memory_limit_bytes``; when None, its container's cgroup limit, and no
            series at all without either (a ratio to "unlimited" would only mislead).
        autoscaler: the builtin autoscaler, when on: its changes and the replicas it last set.
    """

    def __init__(self, broker: Broker, scaling: AutoscaleSettings | None = None, *,
                 memory_limit: int | None = None, autoscaler: Autoscaler | None = None) -> None:
        self.broker = broker
        self.memory_limit = memory_limit if memory_limit is not None else cgroup_memory_limit()
        self.autoscaler = autoscaler
        self.scaling = scaling if scaling is not None else AutoscaleSettings()
        # Until a worker registers and says how many slots it has, the worker's default (as the autoscaler).
        self._slots_per_worker = self.scaling.slots_per_worker or defaults.WORKER_CONCURRENCY
        self.latency = LatencyHistogram()
        self.registry = CollectorRegistry(auto_describe=False)
        self._status: dict[str, Any] = {}
        self._signal: dict[str, Any] = {}
        self._take_status(broker.status())
        self._server: Any = None

    def attach(self) -> BrokerMetrics:
        """Hook into the broker (call before ``serve_forever``, from the thread that runs it)."""
        self.broker.status_hooks.append(self._take_status)
        self.broker.latency_hook = self.latency.observe
        self.registry.register(self)
        # process_* (resident memory, CPU seconds, open fds, start time): the broker's own, per Pod.
        ProcessCollector(registry=self.registry)
        return self

    def _take_status(self, status: dict[str, Any]) -> None:
        """Each tick's snapshot, on the broker's thread: the gauges and the scaling signal of one
        moment, swapped in whole, so /metrics and /scaling always agree with each other."""
        self._signal = self.scaling_signal(status)
        self._status = status

    def scaling_signal(self, status: dict[str, Any]) -> dict[str, Any]:
        """The ``/scaling`` answer for a status snapshot: the policy's numbers (see module doc)."""
        settings = self.scaling
        if settings.slots_per_worker is None:
            self._slots_per_worker = slots_per_worker_of(status.get("workers", ()), self._slots_per_worker)
        load = Load(int(status.get("queued", 0)), int(status.get("busy", 0)), self._slots_per_worker)
        return {
            "demand": load.tasks,
            "queued": load.queued,
            "running": load.running,
            "desired_workers": desired_workers(load, settings),
            "workers": sum(1 for w in status.get("workers", ()) if not w.get("draining")),
            "target_per_worker": target_per_worker(settings, load.slots_per_worker),
            "slots_per_worker": load.slots_per_worker,
            "min_workers": settings.min,
            "max_workers": settings.max,
        }

    def scaling_json(self, accept: str = "") -> metrics_http.Body:
        return json.dumps(self._signal, separators=(",", ":")).encode() + b"\n", "application/json"

    def exposition(self, accept: str = "") -> metrics_http.Body:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def serve(self, port: int, bind: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` and ``/scaling`` on ``bind:port`` from a daemon thread; returns the port (0 picks one)."""
        self._server = metrics_http.serve({"/metrics": self.exposition, "/scaling": self.scaling_json}, port, bind)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def collect(self) -> Iterator[Metric]:
        status = self._status
        ready = [w for w in status.get("workers", ()) if not w.get("draining")]
        busy = status.get("busy", 0)
        gauges = (
            ("queue_depth", "Tasks waiting in the broker's queue for a free slot.", self.broker.core.queued),
            ("slots_busy", "Worker slots running a task (draining workers included).", busy),
            ("slots_free", "Free slots of workers that take tasks.",
             sum(max(0, w["slots"] - w["busy"]) for w in ready)),
            ("slots", "Slots of workers that take tasks (not draining).", status.get("slots", 0)),
            ("workers", "Workers connected to the broker (draining ones included).", len(status.get("workers", ()))),
            ("workers_draining", "Workers finishing their tasks before they leave.",
             len(status.get("workers", ())) - len(ready)),
            ("clients", "Clients connected to the broker.", status.get("clients", 0)),
            ("held_bytes", "Input bytes of the tasks the broker holds (queued or running).",
             status.get("held_bytes", 0)),
            ("runnable_store_bytes", "Bytes of runnables the broker keeps so each is sent once.",
             status.get("runnable_store_bytes", 0)),
            ("unread_bytes", "Reply bytes waiting for peers that have not read them yet.",
             status.get("outbox", {}).get("unread_bytes", 0)),
            ("client_keys", "Client keys with a connection registered (each connection without keys).",
             status.get("client_keys", 0)),
            ("threads_held", "Threads (task affinities) the broker sends to the worker that holds them.",
             status.get("threads_held", 0)),
            ("queue_pinned", "Tasks of a thread waiting for a slot of the worker that holds the thread.",
             status.get("queued_pinned", 0)),
            ("worker_input_bytes", "Input bytes of the tasks sent to workers and not finished (all workers).",
             sum(w.get("input_bytes", 0) for w in status.get("workers", ()))),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = dict(self.broker.counters)
        tasks = CounterMetricFamily(f"{PREFIX}_tasks",
                                    "Calls by outcome since the broker started (each call of a batch counts once).",
                                    labels=["outcome"])
        for outcome in TASK_OUTCOMES:
            tasks.add_metric([outcome], counters.get(outcome, 0))
        yield tasks
        yield CounterMetricFamily(f"{PREFIX}_workers_lost", "Workers that vanished or stopped heartbeating.",
                                  value=counters.get("workers_lost", 0))
        yield CounterMetricFamily(f"{PREFIX}_malformed_messages", "Messages dropped as malformed.",
                                  value=counters.get("malformed", 0))
        yield CounterMetricFamily(f"{PREFIX}_clients_dropped",
                                  "Clients dropped because they did not read their replies.",
                                  value=counters.get("clients_dropped", 0))
        yield CounterMetricFamily(f"{PREFIX}_refused",
                                  "Tasks and peers refused (queue full, unknown key, a key not allowed in its role).",
                                  value=counters.get("refused", 0))
        for name, doc in _IDENTITY_COUNTERS:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=counters.get(name, 0))
        yield HistogramMetricFamily(f"{PREFIX}_task_latency_seconds",
                                    "Seconds from a task's submission to its result, as the broker sees it.",
                                    buckets=self.latency.cumulative(), sum_value=self.latency.sum)
        core = self.broker.core
        yield HistogramMetricFamily(f"{PREFIX}_queue_wait_seconds",
                                    "Seconds from a task's submission to its dispatch to a worker (observed at "
                                    "dispatch; a task that never reaches a worker is not observed).",
                                    buckets=core.queue_wait.cumulative(), sum_value=core.queue_wait.sum)
        errors = CounterMetricFamily(f"{PREFIX}_task_errors",
                                     "ERRORs the broker sent, by code: its own (queue timeout, queue full, ...) and "
                                     "the workers' it relays; codes a client does not know count as 'other'.",
                                     labels=["code"])
        for code, count in list(core.errors_by_code.items()):
            errors.add_metric([code.decode()], count)
        yield errors
        if self.memory_limit is not None:
            yield GaugeMetricFamily(f"{PREFIX}_memory_limit_bytes",
                                    "The memory limit the broker sized its budgets from (--memory-limit, else its "
                                    "container's cgroup limit).", value=self.memory_limit)
        autoscaler = self.autoscaler
        if autoscaler is not None:
            scaled = CounterMetricFamily(f"{PREFIX}_autoscaler_scale",
                                         "Changes of the worker replicas the builtin autoscaler applied, by direction.",
                                         labels=["direction"])
            for direction in AUTOSCALER_DIRECTIONS:
                scaled.add_metric([direction], autoscaler.scaled.get(direction, 0))
            yield scaled
            if autoscaler.replicas_set is not None:
                yield GaugeMetricFamily(f"{PREFIX}_autoscaler_replicas",
                                        "The worker replicas the builtin autoscaler last set.",
                                        value=autoscaler.replicas_set)
        signal = self._signal
        scaling = (
            ("demand", "Calls queued + running: what the scaling policy divides by the target per worker "
                       "(a sub-batch counts its calls; tasks waiting for their thread's worker do not count).",
             signal["demand"]),
            ("desired_workers", "Workers the scaling policy asks for this load, clamped to the min and max workers "
                                "(no idle delay or scale-down window: the scaler keeps those).",
             signal["desired_workers"]),
            ("target_per_worker", "Calls queued + running one worker is meant to carry: min(in-flight, slots per "
                                  "worker) x target. KEDA's threshold for the demand.", signal["target_per_worker"]),
            ("min_workers", "Fewest workers the scaling policy asks for (0: scale to zero when idle).",
             signal["min_workers"]),
            ("max_workers", "Most workers the scaling policy asks for.", signal["max_workers"]),
        )
        for name, doc, number in scaling:
            yield GaugeMetricFamily(f"{PREFIX}_scaling_{name}", doc, value=number)
        info = InfoMetricFamily(f"{PREFIX}_broker", "The broker's package version and wire protocol (value 1).",
                                value={"version": _VERSION, "protocol": PROTOCOL.decode()})
        yield info
