"""The chart's dashboard and alerts on the real test cluster (tests/cluster), against a real
Prometheus that finds the broker Pod the way the chart's Pod annotations describe.

The chart is installed with `metrics.enabled` (the broker's metrics port and its
`prometheus.io/scrape|port|path` annotations), the NetworkPolicy kept on and the host admitted to
the metrics port (`metrics.from`: the pod bridge's host address, where this machine's traffic to a
Pod comes from), as an operator admits their Prometheus. Prometheus runs on this machine, bound to
127.0.0.1, with `kubernetes_sd_configs` (role pod, the cluster's kubeconfig) and the usual
annotation relabeling, and scrapes the broker Pod's own address over the bridge. The PrometheusRule
is rendered by helm with `selector` naming that scrape job (the cluster has no Prometheus Operator,
so the rules are loaded as a rule file) and short waits.

Under load (more calls in flight than the one worker's slots, through `k8s://`), every dashboard
panel query and every alert signal returns data; then the workers are scaled to 0 with calls
waiting, RunnableK8sNoReadyWorkers fires, the workers come back, it resolves and the waiting calls
finish. The broker memory alert reads cAdvisor's working set and kube-state-metrics' limit, which
the test cluster does not run: a small exporter stands in, reporting the broker's own resident
memory (read from its /metrics) against the container's limit from the Pod spec.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity
from langchain_core.runnables import RunnableLambda
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from pool import RunnableK8s
from pool.keys import create_key_directory
from pool.scaling import scale
from tests.support.chart_release import (
    KEY_PREFIX,
    METRICS_PORT,
    RELEASE,
    WORKERS,
    assert_nothing_left,
    close_forward,
    create_key_secrets,
    installed_release,
    metrics_open_to_host,
    ready_pods,
    require_health_dir,
)
from tests.support.dashboard_queries import (
    NO_READY_WORKERS,
    alert_rules,
    check_alert_signals,
    grafana,
    only,
    panel_queries,
    render,
)
from tests.support.helm import CHART
from tests.support.kubernetes_sd import (
    TargetDiscovery,
    annotation_scrape_config,
    kubernetes_sd_available,
    pod_target_groups,
)
from tests.support.load import Load
from tests.support.prometheus import PrometheusServer, prometheus_binary
from tests.support.waiting import wait_for

pytestmark = pytest.mark.cluster
JOB = "kubernetes-pods"  # the job name of the annotation-driven scrape config, as most Prometheus setups call it
SLOTS, CALLERS = 2, 8
# Series only a broker whose builtin autoscaler runs serves (autoscaling.mode builtin). This release
# is scaled by hand, as under KEDA or an HPA, so their panels must parse but need not return data;
# tests/test_prometheus_queries.py proves them against a broker whose autoscaler acted.
BUILTIN_AUTOSCALER_ONLY = "runnable_k8s_autoscaler_"
# A lambda travels by value (cloudpickle): the worker image has no tests package to import a function from.
WORK = lambda seconds: time.sleep(seconds) or "ok"  # noqa: E731


def _values(namespace: str) -> dict[str, Any]:
    return {
        "image": {"tag": "latest", "pullPolicy": "Never"},
        "worker": {"replicas": 1, "slots": SLOTS},
        # The PrometheusRule rendered only (no Prometheus Operator CRD on the test cluster): short
        # waits, the job above.
        "metrics": metrics_open_to_host(prometheusRule={
            "enabled": True, "interval": "1s", "noReadyWorkers": {"for": "2s"},
            "selector": f'namespace="{namespace}", job="{JOB}"'}),
    }


def require_served(pod_ip: str, queries: list[str]) -> None:
    """Fail, saying what to do, unless the broker in the cluster serves every runnable_k8s_* series
    the dashboard reads: the worker image is built from a checkout and may be older than the chart."""
    with urllib.request.urlopen(f"http://{pod_ip}:{METRICS_PORT}/metrics", timeout=5) as response:
        families = {f.name for f in text_string_to_metric_families(response.read().decode())}
    wanted = {re.sub(r"_(bucket|count|sum|total)$", "", name)
              for q in queries for name in re.findall(r"runnable_k8s_[a-z0-9_]+", q)
              if not name.startswith(BUILTIN_AUTOSCALER_ONLY)}
    missing = sorted(wanted - families)
    if missing:
        pytest.fail(f"the broker in runnable-k8s-worker:latest serves no {missing}, which the dashboard reads: the "
                    "image is older than this checkout; rebuild it (bash tests/cluster/build.sh images, then "
                    "python -m tests.cluster down/up)", pytrace=False)


class KubeletStandIn:
    """What cAdvisor and kube-state-metrics would say of the broker container: its working set (the
    broker's own process_resident_memory_bytes, read from its /metrics) and its memory limit (from
    the Pod spec)."""

    def __init__(self, namespace: str, pod: str, pod_ip: str, limit: int) -> None:
        self.namespace, self.pod, self.limit = namespace, pod, limit
        self.url = f"http://{pod_ip}:{METRICS_PORT}/metrics"

    def collect(self) -> Iterator[Metric]:
        with urllib.request.urlopen(self.url, timeout=2) as response:
            text = response.read().decode()
        rss = next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "process_resident_memory_bytes")
        labels, values = ["namespace", "pod", "container"], [self.namespace, self.pod, "broker"]
        working_set = GaugeMetricFamily("container_memory_working_set_bytes", "cAdvisor", labels=labels)
        working_set.add_metric(values, rss)
        yield working_set
        limits = GaugeMetricFamily("kube_pod_container_resource_limits", "kube-state-metrics",
                                   labels=[*labels, "resource", "unit"])
        limits.add_metric([*values, "memory", "byte"], self.limit)
        yield limits


@pytest.mark.timeout(420)
def test_host_prometheus_scrapes_the_chart_by_its_annotations_and_the_no_worker_alert_fires(
        helm_bin, k8s_node, k8s_namespace):
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus gives prometheus and promtool)")
    cp = k8s_node.control_plane
    core, ns, kubeconfig = cp.core(), k8s_namespace, cp.kubeconfig
    folder = Path(tempfile.mkdtemp(prefix="rk8s-prom-cluster-"))
    try:
        keys = create_key_secrets(core, ns, KEY_PREFIX, create_key_directory(folder / "keys"))
        require_health_dir(core, ns)
        values = _values(ns)
        rule = only(render(helm_bin, folder, RELEASE, ns, values), "PrometheusRule")
        rules = {"groups": rule["spec"]["groups"]}
        (folder / "promtool-rules.yaml").write_text(yaml.safe_dump(rules))
        checked = subprocess.run(["promtool", "check", "rules", str(folder / "promtool-rules.yaml")],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        install_values = {**values, "metrics": {k: v for k, v in values["metrics"].items() if k != "prometheusRule"}}
        with installed_release(helm_bin, cp, ns, folder, install_values):
            run(core, ns, kubeconfig, keys, folder, rules)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert not folder.exists()
    assert_nothing_left(cp, ns)


def run(core: Any, ns: str, kubeconfig: str, keys: Path, folder: Path, rules: dict[str, Any]) -> None:
    [broker] = ready_pods(core, ns, "broker")
    pod = core.read_namespaced_pod(broker, ns)
    annotations = pod.metadata.annotations or {}
    assert annotations.get("prometheus.io/scrape") == "true", annotations
    assert annotations.get("prometheus.io/port") == str(METRICS_PORT), annotations
    limit = int(parse_quantity(pod.spec.containers[0].resources.limits["memory"]))
    dashboard = json.loads((CHART / "dashboards" / "runnable-k8s.json").read_text())
    require_served(pod.status.pod_ip, panel_queries(dashboard))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(KubeletStandIn(ns, broker, pod.status.pod_ip, limit))
    kubelet, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    address = f"k8s://{ns}/{RELEASE}"
    # Callers through k8s:// keeping more calls in flight than the pool has slots, so tasks queue.
    load = Load(RunnableK8s(bound=RunnableLambda(WORK), pool=address, mode="warm", timeout=90,
                            k8s_config=kubeconfig, keys=str(keys)), callers=CALLERS, seconds=0.2, join=100)
    discovery = None if kubernetes_sd_available(folder) else TargetDiscovery(pod_target_groups, core, ns)
    print(f"discovery: {'kubernetes_sd_configs' if discovery is None else 'http_sd_configs (pod role stand-in)'}")
    try:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                annotation_scrape_config(JOB, ns, kubeconfig, discovery),
                {"job_name": "kubelet", "honor_labels": True, "scrape_interval": "1s",
                 "static_configs": [{"targets": [f"127.0.0.1:{kubelet.server_address[1]}"]}]},
            ],
        }
        with discovery or nullcontext(), PrometheusServer(folder, config, rules) as prom, load:
            targets = wait_for(lambda: [t for t in prom.api("targets")["activeTargets"]
                                        if t["labels"]["job"] == JOB and t["health"] == "up"], 60,
                               "Prometheus to discover and scrape the broker Pod by its annotations")
            assert [t["labels"]["pod"] for t in targets] == [broker], targets
            assert targets[0]["scrapeUrl"] == f"http://{pod.status.pod_ip}:{METRICS_PORT}/metrics", targets
            check_under_load(prom, dashboard, rules, ns, load)
            check_no_ready_workers_alert(prom, ns, kubeconfig, core, load)
        assert load.errors == [], load.errors[:3]
    finally:
        kubelet.shutdown()
        kubelet.server_close()
        close_forward(address, kubeconfig)


def check_under_load(prom: PrometheusServer, dashboard: dict[str, Any], rules: dict[str, Any], ns: str,
                     load: Load) -> None:
    wait_for(lambda: prom.query(f'runnable_k8s_queue_depth{{namespace="{ns}", job="{JOB}"}} > 0'), 90,
             "Prometheus to see tasks queued under load")
    # The dashboard's variables find this broker.
    assert ns in prom.api("label/namespace/values", **{"match[]": "runnable_k8s_workers"})
    assert JOB in prom.api("label/job/values", **{"match[]": f'runnable_k8s_workers{{namespace="{ns}"}}'})

    exprs = panel_queries(dashboard)
    assert len(exprs) >= 20, exprs
    for expr in exprs:
        query = grafana(expr, JOB, ns)
        prom.query(query)  # parses (an error raises)
        if BUILTIN_AUTOSCALER_ONLY in query:
            continue
        wait_for(lambda q=query: prom.query(q), 30, f"data for the panel query {query}")

    alerts = alert_rules(rules)
    assert "RunnableK8sNoReadyWorkers" in {a["alert"] for a in alerts}
    check_alert_signals(prom, alerts)  # the no-ready-workers one: the scale-to-0 check below
    assert load.done > 0 and not load.errors, (load.done, load.errors[:3])


def check_no_ready_workers_alert(prom: PrometheusServer, ns: str, kubeconfig: str, core: Any, load: Load) -> None:
    scale(f"k8s://{ns}/{RELEASE}", 0, kubeconfig=kubeconfig)
    active = f'ALERTS{{alertname="{NO_READY_WORKERS}"}}'
    firing = wait_for(lambda: prom.alert_state(NO_READY_WORKERS) == "firing" and prom.query(active),
                      90, "RunnableK8sNoReadyWorkers to fire with no worker while calls wait")
    assert firing[0]["metric"]["namespace"] == ns
    assert firing[0]["metric"]["job"] == JOB
    assert firing[0]["metric"]["severity"] == "critical"
    done = load.done
    scale(f"k8s://{ns}/{RELEASE}", 1, kubeconfig=kubeconfig)
    wait_for(lambda: len(ready_pods(core, ns, "worker")) == 1, 120, f"{WORKERS} to have a ready worker again")
    wait_for(lambda: prom.alert_state(NO_READY_WORKERS) is None, 60,
             "RunnableK8sNoReadyWorkers to resolve once workers are back")
    wait_for(lambda: load.done > done + CALLERS, 60, "the waiting calls to run on the returned worker")
