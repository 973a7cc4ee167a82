"""The chart's `autoscaling.mode: hpa` scaling the workers on the real test cluster (tests/cluster).

The chain an operator runs: Prometheus scrapes the broker as the chart's ServiceMonitor describes
(the scrape config the Prometheus Operator would generate from it: role endpoints, the Service's
labels kept, `service`/`namespace`/`pod` labels); a metrics adapter serves
`runnable_k8s_scaling_demand` on the external metrics API by the prometheus-adapter rule the chart
README documents (the README's own YAML, read from it); the chart's HorizontalPodAutoscaler, as
rendered and accepted by the API server, reads it through the aggregation layer and scales the
worker Deployment.

What stands in: the adapter is tests/cluster/metrics-adapter, built on the library
prometheus-adapter is built on (sigs.k8s.io/custom-metrics-apiserver) and running that rule,
because prometheus-adapter itself cannot be fetched here; it runs on this host (its APIService
points at the pod bridge's host address), as Prometheus does. The HPA controller
(kube-controller-manager), the aggregation layer, the RBAC between them and the Deployment are
the cluster's own.

Under load (callers keeping 8 calls in flight against a target of 2 per worker) the HPA scales
1 -> 3 workers (its maximum) and records why; the value it read is the one Prometheus holds;
when the load stops it scales back to 1 after the chart's scale-down window.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import yaml
from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s
from pool.keys import create_key_directory
from tests.support.chart_release import (
    KEY_PREFIX,
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
from tests.support.dashboard_queries import only, render
from tests.support.helm import CHART
from tests.support.kubernetes_sd import (
    TargetDiscovery,
    endpoints_target_groups,
    kubernetes_sd_available,
    service_monitor_scrape_config,
)
from tests.support.load import Load
from tests.support.metrics_adapter import ADAPTER_BINARY, ExternalMetricsAdapter
from tests.support.prometheus import PrometheusServer, prometheus_binary
from tests.support.waiting import wait_for

pytestmark = pytest.mark.cluster
SLOTS, CALLERS, MAX_WORKERS = 2, 8, 3
SCALE_DOWN_WINDOW = 10
METRIC = "runnable_k8s_scaling_demand"
BROKER_SERVICE = f"{RELEASE}-worker-pool-broker"
# A lambda travels by value (cloudpickle): the worker image has no tests package to import a function from.
WORK = lambda seconds: time.sleep(seconds) or "ok"  # noqa: E731


def _values() -> dict[str, Any]:
    return {
        "image": {"tag": "latest", "pullPolicy": "Never"},
        "worker": {"replicas": 1, "slots": SLOTS},
        # the ServiceMonitor rendered only: the test cluster has no Prometheus Operator (its CRDs)
        "metrics": metrics_open_to_host(serviceMonitor={"enabled": True, "interval": "1s"}),
        "autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 1, "maxReplicas": MAX_WORKERS,
                        "targetInFlightPerWorker": SLOTS, "stabilizationWindowSeconds": SCALE_DOWN_WINDOW},
    }


def readme_adapter_rules() -> dict[str, Any]:
    """The prometheus-adapter configuration the chart README gives for the HPA mode."""
    readme = (CHART / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "externalRules:" in b]
    assert len(blocks) == 1, "the chart README should show one prometheus-adapter externalRules example"
    return blocks[0]


@pytest.mark.timeout(540)
def test_the_chart_hpa_scales_the_workers_from_the_broker_metric_through_an_external_metrics_adapter(
        helm_bin, k8s_node, k8s_namespace):
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus gives prometheus and promtool)")
    if not ADAPTER_BINARY.exists():
        pytest.fail(f"{ADAPTER_BINARY} is not built: bash tests/cluster/build-binaries.sh adapter", pytrace=False)
    cp = k8s_node.control_plane
    core, ns = cp.core(), k8s_namespace
    folder = Path(tempfile.mkdtemp(prefix="rk8s-hpa-cluster-"))
    try:
        keys = create_key_secrets(core, ns, KEY_PREFIX, create_key_directory(folder / "keys"))
        require_health_dir(core, ns)
        values = _values()
        rendered = render(helm_bin, folder, RELEASE, ns, values)
        monitor, hpa = only(rendered, "ServiceMonitor"), only(rendered, "HorizontalPodAutoscaler")
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "External" and metric["external"]["metric"]["name"] == METRIC, metric
        assert metric["external"]["metric"]["selector"] == {"matchLabels": {"service": BROKER_SERVICE}}, metric
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": str(SLOTS)}, metric

        install_values = {**values, "metrics": {**values["metrics"], "serviceMonitor": {"enabled": False}}}
        with installed_release(helm_bin, cp, ns, folder, install_values):
            run(cp, ns, keys, folder, monitor)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert not folder.exists()
    assert_nothing_left(cp, ns)


def run(cp: Any, ns: str, keys: Path, folder: Path, monitor: dict[str, Any]) -> None:
    from kubernetes import client

    core, apps, kubeconfig = cp.core(), cp.apps(), cp.kubeconfig
    autoscaling = client.AutoscalingV2Api(cp.api_client)
    [hpa_name] = [h.metadata.name for h in autoscaling.list_namespaced_horizontal_pod_autoscaler(ns).items]
    assert hpa_name == WORKERS
    address = f"k8s://{ns}/{RELEASE}"
    load = Load(RunnableK8s(bound=RunnableLambda(WORK), pool=address, mode="warm", timeout=120,
                            k8s_config=kubeconfig, keys=str(keys)), callers=CALLERS, seconds=0.5, join=100)
    discovery = None if kubernetes_sd_available(folder) else TargetDiscovery(endpoints_target_groups, core, ns)
    scrape = service_monitor_scrape_config(monitor, kubeconfig, discovery)
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}

    def replicas() -> int:
        return int(apps.read_namespaced_deployment(WORKERS, ns).spec.replicas)

    try:
        with (discovery or nullcontext()), PrometheusServer(folder, config) as prom, \
                ExternalMetricsAdapter(cp, ns, folder, readme_adapter_rules(), prom.url) as adapter:
            series = wait_for(lambda: prom.query(f'{METRIC}{{namespace="{ns}", service="{BROKER_SERVICE}"}}'), 60,
                              "Prometheus to scrape the broker through its ServiceMonitor's endpoints")
            assert series[0]["metric"]["job"] == BROKER_SERVICE, series
            assert series[0]["metric"]["endpoint"] == "metrics", series
            # Idle: the adapter serves 0 and the HPA keeps its minimum.
            idle = adapter.values(METRIC, f"service={BROKER_SERVICE}")
            assert [item["value"] for item in idle] == ["0"], idle
            assert replicas() == 1

            with load:
                started = time.monotonic()
                wait_for(lambda: replicas() == MAX_WORKERS, 150,
                         f"the HPA to scale {WORKERS} to {MAX_WORKERS} under load (HPA: "
                         f"{_hpa_state(autoscaling, ns)})", interval=1)
                print(f"the HPA asked for {MAX_WORKERS} workers {time.monotonic() - started:.1f}s after the load began")
                hpa = autoscaling.read_namespaced_horizontal_pod_autoscaler(WORKERS, ns)
                assert hpa.status.desired_replicas == MAX_WORKERS, hpa.status
                [current] = hpa.status.current_metrics
                assert current.type == "External" and current.external.metric.name == METRIC, current
                # What it read is what Prometheus holds: calls in flight, over the 1 worker it had.
                assert current.external.current.average_value is not None, current
                served = adapter.values(METRIC, f"service={BROKER_SERVICE}")
                assert float(_quantity(served[0]["value"])) >= SLOTS * 2, served
                reasons = [e.reason for e in core.list_namespaced_event(
                    ns, field_selector=f"involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name={WORKERS}"
                ).items]
                assert "SuccessfulRescale" in reasons, reasons
                wait_for(lambda: len(ready_pods(core, ns, "worker")) == MAX_WORKERS, 150,
                         f"{MAX_WORKERS} ready workers")
                done = load.done
                wait_for(lambda: load.done > done + 3 * CALLERS, 60, "calls to keep finishing on the new workers")
            assert load.errors == [], load.errors[:3]
            # No load: back to the minimum once the scale-down window has passed.
            stopped = time.monotonic()
            wait_for(lambda: replicas() == 1, SCALE_DOWN_WINDOW + 120,
                     f"the HPA to scale {WORKERS} back to 1 with no load (HPA: {_hpa_state(autoscaling, ns)})",
                     interval=1)
            print(f"the HPA asked for 1 worker {time.monotonic() - stopped:.1f}s after the load ended "
                  f"(scale-down window {SCALE_DOWN_WINDOW}s)")
    finally:
        close_forward(address, kubeconfig)


def _quantity(text: str) -> float:
    from kubernetes.utils.quantity import parse_quantity

    return float(parse_quantity(text))


def _hpa_state(autoscaling: Any, ns: str) -> str:
    try:
        status = autoscaling.read_namespaced_horizontal_pod_autoscaler(WORKERS, ns).status
    except Exception as exc:  # noqa: BLE001 - only for the failure message
        return repr(exc)
    return str({"desired": status.desired_replicas, "current": status.current_replicas,
                "metrics": [m.to_dict() for m in status.current_metrics or []],
                "conditions": [(c.type, c.status, c.reason, c.message) for c in status.conditions or []]})
