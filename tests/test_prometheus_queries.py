"""The chart's Grafana dashboard and PrometheusRule, proven against a real Prometheus scraping a
real broker under load: every panel's query and every alert's expression parses and returns data,
`promtool check rules` accepts the rules, and the "no ready workers" alert fires when the workers
are scaled to 0 under load and resolves when they return.

Prometheus scrapes the broker the way the chart's ServiceMonitor says (its path, its port name
looked up in the rendered Service, the job named after that Service, the release's namespace). The
broker runs with --memory-limit, as the chart starts it (from the container's limit), so the memory
panel and alert read the broker's own series. The builtin autoscaler needs a worker Deployment to
act on, which a local pool has not: its panel is proven on a second scrape target, a broker's real
metrics endpoint whose real autoscaler scales a stand-in for the Deployment up and down.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s
from pool.broker.metrics import BrokerMetrics
from pool.broker.server import Broker
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings
from pool.scaling.policy import Load as Demand
from tests.support import dashboard_queries as dq
from tests.support.load import Load
from tests.support.ports import free_port
from tests.support.prometheus import PrometheusServer, helm_binary, prometheus_binary
from tests.support.scale_stand_in import Deployment
from tests.support.waiting import wait_for

NAMESPACE, RELEASE = "team-a", "rel"
BROKER_MEMORY_LIMIT = 512 * 1024 * 1024
# Rendered with the short waits a test can afford; thresholds stay the chart's defaults.
RULE_VALUES: dict[str, Any] = {"metrics": {
    "enabled": True, "serviceMonitor": {"enabled": True, "interval": "1s"},
    "dashboard": {"enabled": True},
    "prometheusRule": {"enabled": True, "interval": "1s", "noReadyWorkers": {"for": "2s"}},
}}
AUTOSCALED_JOB = "builtin-autoscaler"  # the second target: a broker whose builtin autoscaler acted
NEW_PANELS = ("Queue wait p50 / p99 (submit to dispatch)", "Errors by code /s", "Autoscaler decisions",
              "Broker memory against its limit")


def work(seconds: float) -> str:
    time.sleep(seconds)
    return "ok"


def render(helm_bin: str, folder: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    return dq.render(helm_bin, folder, RELEASE, NAMESPACE, values)


only = dq.only


def grafana(expr: str, job: str) -> str:
    """A panel's expression as Grafana sends it, its variables filled in."""
    return dq.grafana(expr, job, NAMESPACE)


@contextmanager
def autoscaled_broker() -> Iterator[int]:
    """A broker's metrics endpoint with the builtin autoscaler attached, as ``runnable-k8s broker
    --autoscale-deployment`` wires it, after it scaled up once and down once; yields its port."""
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    settings = AutoscaleSettings(min=0, max=8, in_flight=4, window=0, idle=0)
    autoscaler = Autoscaler(settings, Deployment(1), resync=0)
    metrics = BrokerMetrics(broker, scaling=settings, autoscaler=autoscaler, memory_limit=BROKER_MEMORY_LIMIT).attach()
    try:
        autoscaler.step(Demand(queued=12, running=0, slots_per_worker=4))  # up to 3
        autoscaler.step(Demand(queued=0, running=4, slots_per_worker=4))  # down to 1 (window 0)
        assert autoscaler.scaled == {"up": 1, "down": 1}
        yield metrics.serve(0)
    finally:
        metrics.close()
        broker.close()


@pytest.mark.cluster  # needs the helm CLI the cluster tier builds (tests/cluster/build.sh binaries)
@pytest.mark.timeout(300)
def test_dashboard_and_alerts_return_data_from_a_real_prometheus_and_the_no_worker_alert_fires() -> None:
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus gives prometheus and promtool)")
    helm_bin = helm_binary()
    if helm_bin is None:
        pytest.skip("the helm CLI is not built; run: bash tests/cluster/build.sh binaries")
    folder = Path(tempfile.mkdtemp(prefix="rk8s-prometheus-"))
    try:
        run(helm_bin, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert not folder.exists()


def run(helm_bin: str, folder: Path) -> None:
    metrics_port = free_port()
    docs = render(helm_bin, folder, {"metrics": {**RULE_VALUES["metrics"], "port": metrics_port}})
    monitor = only(docs, "ServiceMonitor")
    service = only(docs, "Service")
    rule = only(docs, "PrometheusRule")
    dashboard = json.loads(only(docs, "ConfigMap")["data"]["runnable-k8s.json"])

    # The scrape the ServiceMonitor describes: its endpoint's path, its port name -> the Service's port.
    endpoint = monitor["spec"]["endpoints"][0]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert port == metrics_port
    job = service["metadata"]["name"]  # the Prometheus Operator names the job after the Service

    rules = {"groups": rule["spec"]["groups"]}
    (folder / "promtool-rules.yaml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run(["promtool", "check", "rules", str(folder / "promtool-rules.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout, checked.stdout

    # The broker as the chart starts it: its memory limit from the container's (RUNNABLE_K8S_MEMORY_LIMIT).
    broker_args = ["--metrics-port", str(port), "--memory-limit", str(BROKER_MEMORY_LIMIT)]
    with LocalPool(workers=2, slots=2, broker_args=broker_args) as pool, autoscaled_broker() as autoscaled:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "metrics_path": endpoint["path"], "scrape_interval": "1s",
                 "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE}}]},
                {"job_name": AUTOSCALED_JOB, "metrics_path": endpoint["path"], "scrape_interval": "1s",
                 "static_configs": [{"targets": [f"127.0.0.1:{autoscaled}"], "labels": {"namespace": NAMESPACE}}]},
            ],
        }
        remote = RunnableK8s(bound=RunnableLambda(work), pool=pool.address, mode="warm", timeout=60)
        with PrometheusServer(folder, config, rules) as prom, Load(remote, callers=8, seconds=0.1, join=70) as load:
            check_under_load(prom, dashboard, rules, job, load)
            check_no_ready_workers_alert(prom, pool, load)
        assert load.errors == [], load.errors[:3]


def check_under_load(prom: PrometheusServer, dashboard: dict[str, Any], rules: dict[str, Any], job: str,
                     load: Load) -> None:
    wait_for(lambda: prom.query(f'runnable_k8s_queue_depth{{job="{job}"}} > 0'), 60,
             "Prometheus to see tasks queued under load")
    # The dashboard's variables find this broker.
    assert NAMESPACE in prom.api("label/namespace/values", **{"match[]": "runnable_k8s_workers"})
    assert job in prom.api("label/job/values", **{"match[]": f'runnable_k8s_workers{{namespace="{NAMESPACE}"}}'})

    titles = {panel["title"] for panel in dashboard["panels"]}
    assert set(NEW_PANELS) <= titles, titles
    exprs = dq.panel_queries(dashboard)
    assert len(exprs) >= 24, exprs
    # The broker's own series, no kubelet or kube-state-metrics: every query reads runnable_k8s_* or process_*.
    assert not [e for e in exprs if "container_memory" in e or "kube_pod" in e], exprs
    for name in ("runnable_k8s_queue_wait_seconds_bucket", "runnable_k8s_task_errors_total",
                 "runnable_k8s_autoscaler_scale_total", "runnable_k8s_autoscaler_replicas",
                 "runnable_k8s_memory_limit_bytes"):
        assert any(name in e for e in exprs), f"no panel reads {name}"
    for expr in exprs:
        # The builtin autoscaler's series exist only where it runs: the second target.
        query = grafana(expr, AUTOSCALED_JOB if "runnable_k8s_autoscaler_" in expr else job)
        wait_for(lambda q=query: prom.query(q), 30, f"data for the panel query {query}")
    ups = prom.query(grafana('sum by (direction) (increase(runnable_k8s_autoscaler_scale_total'
                             '{namespace="$namespace", job=~"$job"}[5m]))', AUTOSCALED_JOB))
    assert {r["metric"]["direction"] for r in ups} == {"up", "down"}, ups
    replicas = prom.query(grafana('max(runnable_k8s_autoscaler_replicas{namespace="$namespace", job=~"$job"})',
                                  AUTOSCALED_JOB))
    assert float(replicas[0]["value"][1]) == 1.0, replicas
    limit = prom.query(f'runnable_k8s_memory_limit_bytes{{job="{job}"}}')
    assert float(limit[0]["value"][1]) == BROKER_MEMORY_LIMIT, limit
    waits = prom.query(f'sum(runnable_k8s_queue_wait_seconds_count{{job="{job}"}})')
    assert float(waits[0]["value"][1]) > 0, "tasks were dispatched under load, so waits were observed"

    alerts = dq.alert_rules(rules)
    assert {a["alert"] for a in alerts} == {"RunnableK8sNoReadyWorkers", "RunnableK8sQueueWaiting",
                                            "RunnableK8sWorkersLost", "RunnableK8sBrokerMemoryHigh",
                                            "RunnableK8sClientsDropped"}
    for alert in alerts:
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert re.search(r"README\.md#runbook-[a-z0-9]+$", alert["annotations"]["runbook_url"]), alert
    dq.check_alert_signals(prom, alerts)  # the no-ready-workers one: the scale-to-0 check below
    assert load.done > 0


def check_no_ready_workers_alert(prom: PrometheusServer, pool: LocalPool, load: Load) -> None:
    pool.scale(0)
    active = f'ALERTS{{alertname="{dq.NO_READY_WORKERS}"}}'
    firing = wait_for(lambda: prom.alert_state(dq.NO_READY_WORKERS) == "firing" and prom.query(active),
                      60, "RunnableK8sNoReadyWorkers to fire with no worker while calls wait")
    assert firing[0]["metric"]["namespace"] == NAMESPACE
    assert firing[0]["metric"]["severity"] == "critical"
    done = load.done
    pool.scale(2)
    wait_for(lambda: prom.alert_state(dq.NO_READY_WORKERS) is None, 60,
             "RunnableK8sNoReadyWorkers to resolve once workers are back")
    wait_for(lambda: load.done > done, 60, "the waiting calls to run on the returned workers")
