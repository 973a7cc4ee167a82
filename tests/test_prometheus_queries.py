"""The chart's Grafana dashboard and PrometheusRule, proven against a real Prometheus scraping a
real broker under load: every panel's query and every alert's expression parses and returns data,
`promtool check rules` accepts the rules, and the "no ready workers" alert fires when the workers
are scaled to 0 under load and resolves when they return.

Prometheus scrapes the broker the way the chart's ServiceMonitor says (its path, its port name
looked up in the rendered Service, the job named after that Service, the release's namespace). The
broker's memory alert reads the kubelet's cAdvisor series and kube-state-metrics' limit, which no
local process serves: a small exporter in the test stands in for both, reporting the broker
process's real resident memory against a limit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from langchain_core.runnables import RunnableLambda
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from pool import LocalPool, RunnableK8s
from tests.support.helm import CHART, helm, values_file
from tests.support.ports import free_port
from tests.support.prometheus import PrometheusServer, helm_binary, prometheus_binary
from tests.support.waiting import wait_for

NAMESPACE, RELEASE = "team-a", "rel"
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval at a 1 s scrape: four scrapes
BROKER_MEMORY_LIMIT = 512 * 1024 * 1024
# Rendered with the short waits a test can afford; thresholds stay the chart's defaults.
RULE_VALUES: dict[str, Any] = {"metrics": {
    "enabled": True, "serviceMonitor": {"enabled": True, "interval": "1s"},
    "dashboard": {"enabled": True},
    "prometheusRule": {"enabled": True, "interval": "1s", "noReadyWorkers": {"for": "2s"}},
}}
# An alert expression is "<signal> <comparison> <number>"; the signal must return data under load.
THRESHOLD = re.compile(r"^(?P<signal>.+?)\s*(?P<op>>|<|==|>=|<=|!=)\s*(?P<threshold>[0-9.]+)$", re.S)


def work(seconds: float) -> str:
    time.sleep(seconds)
    return "ok"


def render(helm_bin: str, folder: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    result = helm(helm_bin, "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", values_file(folder, values),
                  tmp_path=folder)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def grafana(expr: str, job: str) -> str:
    """A panel's expression as Grafana sends it, its variables filled in."""
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", NAMESPACE)
            .replace("$job", job))


class KubeletStandIn:
    """What the kubelet's cAdvisor and kube-state-metrics say of the broker container: its working
    set (the broker process's resident memory, read from /proc) and its memory limit."""

    def __init__(self, pid: int, pod: str) -> None:
        self.pid, self.pod = pid, pod

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "pod", "container"]
        values = [NAMESPACE, self.pod, "broker"]
        rss = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        working_set = GaugeMetricFamily("container_memory_working_set_bytes", "cAdvisor", labels=labels)
        working_set.add_metric(values, rss)
        yield working_set
        limits = GaugeMetricFamily("kube_pod_container_resource_limits", "kube-state-metrics",
                                   labels=[*labels, "resource", "unit"])
        limits.add_metric([*values, "memory", "byte"], BROKER_MEMORY_LIMIT)
        yield limits


class Load:
    """Callers that keep more tasks in flight than the pool has slots, so tasks queue."""

    def __init__(self, address: str, callers: int) -> None:
        self.runnable = RunnableK8s(bound=RunnableLambda(work), pool=address, mode="warm", timeout=60)
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]

    def _call(self) -> None:
        while not self.stop.is_set():
            try:
                self.runnable.invoke(0.1)
                self.done += 1
            except Exception as exc:  # noqa: BLE001 - kept, and the test asserts there are none
                self.errors.append(exc)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(70)


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

    with LocalPool(workers=2, slots=2, broker_args=["--metrics-port", str(port)]) as pool:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(KubeletStandIn(pool.pids[0], f"{job}-5d8f7c9b4-x2x7q"))
        kubelet, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        try:
            config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": job, "metrics_path": endpoint["path"], "scrape_interval": "1s",
                     "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                         "labels": {"namespace": NAMESPACE}}]},
                    {"job_name": "kubelet", "honor_labels": True, "scrape_interval": "1s",
                     "static_configs": [{"targets": [f"127.0.0.1:{kubelet.server_address[1]}"]}]},
                ],
            }
            with PrometheusServer(folder, config, rules) as prom, Load(pool.address, callers=8) as load:
                check_under_load(prom, dashboard, rules, job, load)
                check_no_ready_workers_alert(prom, pool, load)
            assert load.errors == [], load.errors[:3]
        finally:
            kubelet.shutdown()
            kubelet.server_close()


def check_under_load(prom: PrometheusServer, dashboard: dict[str, Any], rules: dict[str, Any], job: str,
                     load: Load) -> None:
    wait_for(lambda: prom.query(f'runnable_k8s_queue_depth{{job="{job}"}} > 0'), 60,
             "Prometheus to see tasks queued under load")
    # The dashboard's variables find this broker.
    assert NAMESPACE in prom.api("label/namespace/values", **{"match[]": "runnable_k8s_workers"})
    assert job in prom.api("label/job/values", **{"match[]": f'runnable_k8s_workers{{namespace="{NAMESPACE}"}}'})

    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    assert len(exprs) >= 20, exprs
    for expr in exprs:
        query = grafana(expr, job)
        wait_for(lambda q=query: prom.query(q), 30, f"data for the panel query {query}")

    alerts = [r for group in rules["groups"] for r in group["rules"]]
    assert {a["alert"] for a in alerts} == {"RunnableK8sNoReadyWorkers", "RunnableK8sQueueWaiting",
                                            "RunnableK8sWorkersLost", "RunnableK8sBrokerMemoryHigh",
                                            "RunnableK8sClientsDropped"}
    for alert in alerts:
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert re.search(r"README\.md#runbook-[a-z0-9]+$", alert["annotations"]["runbook_url"]), alert
        prom.query(alert["expr"])  # parses (an error raises)
        if alert["alert"] == "RunnableK8sNoReadyWorkers":
            continue  # returns data only with no worker: the scale-to-0 check below
        match = THRESHOLD.match(alert["expr"])
        assert match, f"{alert['alert']}: not <signal> <op> <number>: {alert['expr']}"
        signal = match["signal"]
        wait_for(lambda s=signal: prom.query(s), 30, f"data for {alert['alert']}'s signal {signal}")
    # Under load with workers there, the "no ready workers" alert stays silent.
    assert not prom.query('ALERTS{alertname="RunnableK8sNoReadyWorkers"}')
    assert load.done > 0


def check_no_ready_workers_alert(prom: PrometheusServer, pool: LocalPool, load: Load) -> None:
    def state() -> str | None:
        found = [a for a in prom.alerts() if a["labels"]["alertname"] == "RunnableK8sNoReadyWorkers"]
        return found[0]["state"] if found else None

    pool.scale(0)
    firing = wait_for(lambda: state() == "firing" and prom.query('ALERTS{alertname="RunnableK8sNoReadyWorkers"}'),
                      60, "RunnableK8sNoReadyWorkers to fire with no worker while calls wait")
    assert firing[0]["metric"]["namespace"] == NAMESPACE
    assert firing[0]["metric"]["severity"] == "critical"
    done = load.done
    pool.scale(2)
    wait_for(lambda: state() is None, 60, "RunnableK8sNoReadyWorkers to resolve once workers are back")
    wait_for(lambda: load.done > done, 60, "the waiting calls to run on the returned workers")
