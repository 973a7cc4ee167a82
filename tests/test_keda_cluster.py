"""The chart's `autoscaling.mode: keda` acted on by KEDA's own operator on the real test cluster
(tests/cluster): scale to zero and back, from the broker's `/scaling`.

The chart is installed with KEDA's CRDs in place (KEDA v2.20.2, from its Go module); KEDA's
operator (built from the same module, run on this host: tests/support/keda.py) reconciles the
chart's ScaledObject as rendered: its `metrics-api` trigger polls the broker's `/scaling` JSON
(`valueLocation: demand`), it creates the HPA with the chart's behavior, and it scales the worker
Deployment to zero when no call is queued or running, and out of zero when one is. Calls made at
zero workers wait in the broker's queue and complete once KEDA has brought a worker.

What stands in: the trigger's URL is the broker Pod's address (set with `helm upgrade` once the
Pod has one) rather than the broker Service's DNS name, which this host, where the operator runs,
cannot resolve. KEDA's metrics server, which would serve the HPA KEDA makes (scaling beyond one
worker), is not run: its metrics listener binds every interface. The HPA mode's test
(tests/test_hpa_cluster.py) covers that part of the path with the cluster's HPA controller.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s
from pool.keys import create_key_directory
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
from tests.support.helm import CHART, helm, values_file
from tests.support.keda import KEDA_OPERATOR, KEDA_VERSION, KedaCrds, KedaOperator, keda_module_dir
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
SLOTS, CALLERS, IDLE_SECONDS = 2, 4, 5
# A lambda travels by value (cloudpickle): the worker image has no tests package to import a function from.
WORK = lambda seconds: time.sleep(seconds) or "ok"  # noqa: E731


def _values(keda: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": {"tag": "latest", "pullPolicy": "Never"},
        "worker": {"replicas": 1, "slots": SLOTS},
        "metrics": metrics_open_to_host(),
        "autoscaling": {"enabled": True, "mode": "keda", "minReplicas": 0, "maxReplicas": 3,
                        "targetInFlightPerWorker": SLOTS, "scaleToZeroIdleSeconds": IDLE_SECONDS,
                        "stabilizationWindowSeconds": 10, "keda": {"pollingInterval": 1, **keda}},
    }


@contextmanager
def prometheus_scraping_the_broker(trigger: str, cp: Any, ns: str, folder: Path) -> Iterator[str | None]:
    """For the prometheus trigger: a Prometheus on 127.0.0.1 scraping the namespace's Pods by their
    prometheus.io/* annotations (the chart's default query reads its namespace and pod labels);
    its URL. Nothing for the metrics-api trigger."""
    if trigger != "prometheus":
        yield None
        return
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus gives prometheus and promtool)")
    discovery = None if kubernetes_sd_available(folder) else TargetDiscovery(pod_target_groups, cp.core(), ns)
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [annotation_scrape_config("kubernetes-pods", ns, cp.kubeconfig, discovery)]}
    with discovery or nullcontext(), PrometheusServer(folder, config) as prom:
        yield prom.url


@pytest.mark.timeout(540)
@pytest.mark.parametrize("trigger", ["metrics-api", "prometheus"])
def test_keda_scales_the_chart_workers_to_zero_and_back_from_the_broker_load(
        helm_bin, k8s_node, k8s_namespace, trigger):
    if not KEDA_OPERATOR.exists():
        pytest.fail(f"{KEDA_OPERATOR} is not built: bash tests/cluster/build-binaries.sh keda", pytrace=False)
    cp = k8s_node.control_plane
    core, ns = cp.core(), k8s_namespace
    folder = Path(tempfile.mkdtemp(prefix="rk8s-keda-cluster-"))
    operator = None
    try:
        keys = create_key_secrets(core, ns, KEY_PREFIX, create_key_directory(folder / "keys"))
        require_health_dir(core, ns)
        crds = keda_module_dir() / "config/crd/bases"
        with prometheus_scraping_the_broker(trigger, cp, ns, folder) as prometheus_url, KedaCrds(cp, crds):
            keda = ({"trigger": "prometheus", "prometheus": {"serverAddress": prometheus_url}}
                    if prometheus_url else {})
            with installed_release(helm_bin, cp, ns, folder, _values(keda)):
                if trigger == "metrics-api":
                    # The trigger's URL is the broker Pod's before the operator starts, so it never
                    # asks this host's resolver for a cluster name.
                    set_trigger_url(cp, ns, folder, helm_bin)
                with KedaOperator(cp, ns, folder) as operator:
                    run(cp, ns, keys, operator, trigger)
    except BaseException:
        if operator is not None:
            print(f"keda-operator {KEDA_VERSION} log:\n{operator.log_tail()}")
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert not folder.exists()
    assert_nothing_left(cp, ns)


def set_trigger_url(cp: Any, ns: str, folder: Path, helm_bin: str) -> None:
    core = cp.core()
    [broker] = ready_pods(core, ns, "broker")
    url = f"http://{core.read_namespaced_pod(broker, ns).status.pod_ip}:{METRICS_PORT}/scaling"
    upgrade = helm(helm_bin, "upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values", "-f",
                   values_file(folder, {"autoscaling": {"keda": {"metricsApi": {"url": url}}}}, "url.yaml"),
                   "--wait", "--timeout", "120s", tmp_path=folder, kubeconfig=cp.kubeconfig, timeout=150)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr


def run(cp: Any, ns: str, keys: Path, operator: KedaOperator, trigger: str) -> None:
    from kubernetes import client

    core, apps, kubeconfig = cp.core(), cp.apps(), cp.kubeconfig
    objects = client.CustomObjectsApi(cp.api_client)
    autoscaling = client.AutoscalingV2Api(cp.api_client)

    def scaled_object() -> dict[str, Any]:
        return objects.get_namespaced_custom_object("keda.sh", "v1alpha1", ns, "scaledobjects", WORKERS)

    def condition(kind: str) -> str | None:
        found = [c for c in scaled_object().get("status", {}).get("conditions", []) if c["type"] == kind]
        return found[0]["status"] if found else None

    def replicas() -> int:
        return int(apps.read_namespaced_deployment(WORKERS, ns).spec.replicas or 0)

    [rendered] = scaled_object()["spec"]["triggers"]
    assert rendered["type"] == trigger, rendered
    if trigger == "metrics-api":
        assert rendered["metadata"]["url"].startswith("http://10.234.0."), rendered
    else:  # the chart's default query
        assert rendered["metadata"]["query"] == (
            f'max(runnable_k8s_scaling_demand{{namespace="{ns}",pod=~"{RELEASE}-worker-pool-broker-.*"}})'), rendered
    wait_for(lambda: condition("Ready") == "True", 60, f"KEDA to accept the chart's ScaledObject: "
             f"{_state(scaled_object)}")
    # The HPA KEDA made carries the chart's behavior and the target per worker.
    hpa = autoscaling.read_namespaced_horizontal_pod_autoscaler(f"keda-hpa-{WORKERS}", ns)
    assert hpa.spec.behavior.scale_down.stabilization_window_seconds == 10, hpa.spec.behavior
    assert hpa.spec.behavior.scale_up.stabilization_window_seconds == 0, hpa.spec.behavior
    [metric] = hpa.spec.metrics
    assert metric.external.target.average_value == str(SLOTS), metric

    # Idle: KEDA takes the workers to zero once IDLE_SECONDS have passed with no call.
    wait_for(lambda: replicas() == 0 and not ready_pods(core, ns, "worker"), 90,
             f"KEDA to scale {WORKERS} to zero when idle: {_state(scaled_object)}")
    assert condition("Active") != "True"  # Unknown until the first activation, False after

    address = f"k8s://{ns}/{RELEASE}"
    load = Load(RunnableK8s(bound=RunnableLambda(WORK), pool=address, mode="warm", timeout=120,
                            k8s_config=kubeconfig, keys=str(keys)), callers=CALLERS, seconds=0.3, join=100)
    try:
        with load:
            started = time.monotonic()
            # Calls wait in the broker's queue; its demand activates the trigger.
            wait_for(lambda: replicas() >= 1, 60, f"KEDA to scale {WORKERS} out of zero under load: "
                     f"{_state(scaled_object)}")
            print(f"{trigger}: KEDA asked for a worker {time.monotonic() - started:.1f}s after the first call "
                  f"(pollingInterval 1s)")
            assert condition("Active") == "True"
            wait_for(lambda: load.done >= 1, 120, "the first call made at zero workers to complete")
            print(f"{trigger}: the first call made at zero workers completed after {time.monotonic() - started:.1f}s")
            wait_for(lambda: load.done >= 3 * CALLERS, 120, "the calls made at zero workers to complete")
        assert load.errors == [], load.errors[:3]
        stopped = time.monotonic()
        wait_for(lambda: replicas() == 0, 90, f"KEDA to scale {WORKERS} back to zero after the load")
        print(f"{trigger}: KEDA scaled to zero {time.monotonic() - stopped:.1f}s after the load ended "
              f"(cooldownPeriod {IDLE_SECONDS}s)")
    finally:
        close_forward(address, kubeconfig)
    failures = [line for line in operator.log_tail(1_000_000).splitlines() if "\tERROR\t" in line]
    assert failures == [], failures[:5]


def _state(scaled_object: Any) -> str:
    try:
        status = scaled_object().get("status", {})
    except Exception as exc:  # noqa: BLE001 - only for a failure message
        return repr(exc)
    return str([(c["type"], c["status"], c.get("reason"), c.get("message")) for c in status.get("conditions", [])])
