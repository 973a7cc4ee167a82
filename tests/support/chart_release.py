"""A release of the worker-pool chart on the real test cluster (tests/cluster): its names, its
Pods by component, its key Secrets, what to print when it fails, and the check that uninstall left
nothing. Shared by the chart's cluster tests (tests/test_chart*_cluster.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pool.keys import key_secret_manifests
from tests.support.helm import CHART, helm, values_file
from tests.support.waiting import wait_for

RELEASE = "pool"
WORKERS = f"{RELEASE}-worker-pool-worker"
# The chart's default key Secrets (curve.existingSecret): KEY_PREFIX-broker, -worker, -clients.
KEY_PREFIX = "runnable-k8s-curve"
METRICS_PORT = 9090


def metrics_open_to_host(**more: Any) -> dict[str, Any]:
    """`metrics` values serving the broker's metrics port to this host, as an operator admits their
    Prometheus (`metrics.from`): host-to-Pod traffic comes from the pod bridge's host address."""
    from tests.cluster.cluster import POD_GATEWAY

    return {"enabled": True, "port": METRICS_PORT, "from": [{"ipBlock": {"cidr": f"{POD_GATEWAY}/32"}}], **more}
COMPONENT = "app.kubernetes.io/instance={release},app.kubernetes.io/component={component}"


_IMAGE_HELP: dict[str, str] = {}


def require_health_dir(core, namespace: str) -> None:
    """Fail unless the worker image on the node has `python -m worker --health-dir` (the chart's
    probes run it): asked of the image itself, once per session, with a Pod running `--help`."""
    from kubernetes import client

    if "worker" not in _IMAGE_HELP:
        name = "worker-help"
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PodSpec(restart_policy="Never", automount_service_account_token=False, containers=[
                client.V1Container(name="help", image="runnable-k8s-worker:latest", image_pull_policy="Never",
                                   command=["python", "-m", "worker", "--help"])])))
        wait_for(lambda: core.read_namespaced_pod(name, namespace).status.phase in ("Succeeded", "Failed"), 60,
                 "the worker --help Pod", interval=0.5)
        _IMAGE_HELP["worker"] = core.read_namespaced_pod_log(name, namespace)
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    if "--health-dir" not in _IMAGE_HELP["worker"]:
        pytest.fail("the worker image runnable-k8s-worker:latest has no `python -m worker --health-dir`, which the "
                    "chart's readiness and liveness probes run: it is older than this checkout; rebuild it "
                    "(bash tests/cluster/build.sh images, then python -m tests.cluster down/up). `--help` said:\n"
                    + _IMAGE_HELP["worker"][-2000:], pytrace=False)


def create_key_secrets(core, namespace: str, prefix: str, tree: Path) -> Path:
    """What `runnable-k8s keys TREE --k8s-secret PREFIX` makes: one Secret per role (PREFIX-broker,
    -clients, -workers, -worker, -client-NAME). Returns the folder of the tree's client "default"."""
    for manifest in key_secret_manifests(tree, prefix):
        core.create_namespaced_secret(namespace, manifest)
    return tree / "clients" / "default"


def ready_pods(core, namespace: str, component: str) -> list[str]:
    pods = core.list_namespaced_pod(namespace, label_selector=COMPONENT.format(release=RELEASE, component=component))
    return sorted(p.metadata.name for p in pods.items if p.metadata.deletion_timestamp is None
                  and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or [])))


def pods_left(core, namespace: str, component: str) -> list[str]:
    pods = core.list_namespaced_pod(namespace, label_selector=COMPONENT.format(release=RELEASE, component=component))
    return sorted(p.metadata.name for p in pods.items)


def describe(core, namespace: str) -> str:
    """Pods, their states and recent events: what a failing assertion should show."""
    lines = []
    for pod in core.list_namespaced_pod(namespace).items:
        states = [(c.name, c.ready, c.restart_count, c.state.to_dict()) for c in (pod.status.container_statuses or [])]
        lines.append(f"{pod.metadata.name} {pod.status.phase} {states}")
        try:
            lines.append(core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=20))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            lines.append(f"<no logs: {exc}>")
    for event in core.list_namespaced_event(namespace).items[-15:]:
        lines.append(f"event {event.involved_object.name}: {event.reason} {event.message}")
    return "\n".join(lines)


def run_to_completion(core, namespace: str, pod, timeout: float) -> str:
    """Run ``pod`` (a client Pod of a test) until it succeeds or fails, delete it, and return its log;
    a Pod that fails or outlasts ``timeout`` fails the test with its log and the namespace described."""
    core.create_namespaced_pod(namespace, pod)
    name = pod.metadata.name
    deadline = time.monotonic() + timeout
    while (phase := core.read_namespaced_pod(name, namespace).status.phase) not in ("Succeeded", "Failed"):
        assert time.monotonic() < deadline, f"Pod {name} did not finish in {timeout} s\n" + describe(core, namespace)
        time.sleep(0.5)
    logs = core.read_namespaced_pod_log(name, namespace)
    assert phase == "Succeeded", logs[-3000:] + describe(core, namespace)
    core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    return logs


def assert_nothing_left(cp, ns: str) -> None:
    """Nothing of the release stays: no Pod, workload, Service, account, role, policy or release Secret."""
    from kubernetes import client

    selector = f"app.kubernetes.io/instance={RELEASE}"
    core, apps = cp.core(), cp.apps()
    rbac, policy = client.RbacAuthorizationV1Api(cp.api_client), client.PolicyV1Api(cp.api_client)
    net = client.NetworkingV1Api(cp.api_client)
    wait_for(lambda: not core.list_namespaced_pod(ns, label_selector=selector).items, 90,
             "the release's Pods to be gone", interval=0.5)
    left = {
        "deployments": apps.list_namespaced_deployment(ns, label_selector=selector).items,
        "services": core.list_namespaced_service(ns, label_selector=selector).items,
        "serviceaccounts": core.list_namespaced_service_account(ns, label_selector=selector).items,
        "roles": rbac.list_namespaced_role(ns, label_selector=selector).items,
        "rolebindings": rbac.list_namespaced_role_binding(ns, label_selector=selector).items,
        "pdbs": policy.list_namespaced_pod_disruption_budget(ns, label_selector=selector).items,
        "networkpolicies": net.list_namespaced_network_policy(ns, label_selector=selector).items,
        "helm release secrets": core.list_namespaced_secret(ns, label_selector=f"owner=helm,name={RELEASE}").items,
    }
    assert not any(left.values()), {k: [o.metadata.name for o in v] for k, v in left.items() if v}


def helm_test_passes(helm_bin: str, core, namespace: str, tmp_path: Path, kubeconfig: str) -> str:
    """`helm test` of the release (its hook Pod makes a real call through the pool), asserted to
    pass; its output."""
    test = helm(helm_bin, "test", RELEASE, "-n", namespace, "--timeout", "120s", tmp_path=tmp_path,
                kubeconfig=kubeconfig, timeout=150)
    assert test.returncode == 0, test.stdout + test.stderr + describe(core, namespace)
    assert "Phase:          Succeeded" in test.stdout, test.stdout
    return test.stdout


@contextmanager
def installed_release(helm_bin: str, cp: Any, namespace: str, folder: Path, values: dict[str, Any]) -> Iterator[None]:
    """The chart installed as RELEASE with ``values`` (`helm install --wait`, asserted to succeed)
    while the block runs; `helm uninstall --wait` after it. On a failure, inside the block or in
    the install, what the namespace holds is printed first."""
    core, kubeconfig = cp.core(), cp.kubeconfig
    installed = False
    try:
        install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", namespace, "-f",
                       values_file(folder, values, "install.yaml"), "--wait", "--timeout", "180s",
                       tmp_path=folder, kubeconfig=kubeconfig, timeout=210)
        installed = True
        assert install.returncode == 0, install.stdout + install.stderr + describe(core, namespace)
        yield
    except BaseException:
        print(describe(core, namespace))
        raise
    finally:
        if installed:
            helm(helm_bin, "uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "120s",
                 tmp_path=folder, kubeconfig=kubeconfig, timeout=150)


def close_forward(address: str, kubeconfig: str) -> None:
    """Close the port-forward a ``k8s://`` client shares to the release's broker, and the
    connections through it: the test that made calls through it owns them."""
    from pool.client.connection import Connection
    from pool.k8s.portforward import BrokerForward

    forward = BrokerForward.shared(address, kubeconfig)
    Connection.close_all(forward.local_address)
    forward.close()
