"""The worker-pool chart with its default wiring on the real test cluster (tests/cluster), which
has kube-proxy and CoreDNS: nothing on the host network, no broker address set by hand.

The workers find the broker the way they do in any cluster, by the Service name the chart writes
(tcp://RELEASE-worker-pool-broker.NAMESPACE.svc:5555), resolved by CoreDNS and DNATed by kube-proxy
to the broker Pod; `helm test` calls through that Service; and a client Pod in the namespace, with
its own CURVE key Secret mounted, calls the pool by the Service's short name. Only what the test
cluster requires differs from the chart's defaults: the local image (tag latest, pullPolicy Never).
The key Secrets are the ones `runnable-k8s keys ... --k8s-secret runnable-k8s-curve` makes (the
chart's default curve.existingSecret), created with the helper tests/test_chart_cluster.py uses.
"""

from __future__ import annotations

import json
import time

import pytest

from pool.keys import create_key_directory
from tests.support.chart_release import (
    KEY_PREFIX,
    RELEASE,
    WORKERS,
    assert_nothing_left,
    create_key_secrets,
    describe,
    helm_test_passes,
    ready_pods,
    require_health_dir,
    run_to_completion,
)
from tests.support.helm import CHART, helm, values_file

pytestmark = pytest.mark.cluster
BROKER = f"{RELEASE}-worker-pool-broker"  # the chart's Service (and Deployment) name for RELEASE

# A client in the cluster: the pool by the Service's short name (same namespace), the client's
# own key pair mounted from PREFIX-client-default. Prints one JSON line: results and workers seen.
CLIENT_PROGRAM = """\
import json, os, time
from langchain_core.runnables import RunnableLambda
from pool import RunnableK8s

def double_where(x):
    import os
    return {"double": x * 2, "pod": os.environ["POD_NAME"]}

remote = RunnableK8s(bound=RunnableLambda(double_where), pool=os.environ["POOL"], mode="warm",
                     keys="/etc/runnable-k8s/keys", timeout=60)
out = {"invoke": remote.invoke(21)["double"], "batches": [], "pods": []}
pods, deadline = set(), time.monotonic() + 60
while len(pods) < 2 and time.monotonic() < deadline:  # both workers serve through the one broker
    results = remote.batch(list(range(8)))
    out["batches"].append([r["double"] for r in results])
    pods |= {r["pod"] for r in results}
out["pods"] = sorted(pods)
print(json.dumps(out))
"""


def _client_pod(namespace: str, pool: str):
    """The worker image as a client, run as the image's user (10001) like the chart's Pods, with
    the client key Secret readable through fsGroup (mode 0440, as the chart mounts keys)."""
    from kubernetes import client

    return client.V1Pod(
        # The label the chart's NetworkPolicy (on by default) admits to the broker: the test
        # cluster does not enforce policies, but a client Pod elsewhere needs it.
        metadata=client.V1ObjectMeta(name="in-cluster-client", labels={f"{RELEASE}-worker-pool-client": "true"}),
        spec=client.V1PodSpec(
            restart_policy="Never", automount_service_account_token=False, termination_grace_period_seconds=1,
            security_context=client.V1PodSecurityContext(run_as_user=10001, run_as_group=10001, fs_group=10001,
                                                         run_as_non_root=True),
            containers=[client.V1Container(
                name="client", image="runnable-k8s-worker:latest", image_pull_policy="Never",
                command=["python", "-c", CLIENT_PROGRAM],
                env=[client.V1EnvVar(name="POOL", value=pool), client.V1EnvVar(name="HOME", value="/tmp")],
                volume_mounts=[client.V1VolumeMount(name="keys", mount_path="/etc/runnable-k8s/keys",
                                                    read_only=True)])],
            volumes=[client.V1Volume(name="keys", secret=client.V1SecretVolumeSource(
                secret_name=f"{KEY_PREFIX}-client-default", default_mode=0o440))]))


@pytest.mark.timeout(480)
def test_the_default_chart_wiring_works_through_services(helm_bin, k8s_node, k8s_namespace, tmp_path):
    cp = k8s_node.control_plane
    core, ns, kubeconfig = cp.core(), k8s_namespace, cp.kubeconfig
    create_key_secrets(core, ns, KEY_PREFIX, create_key_directory(tmp_path / "keys"))
    require_health_dir(core, ns)
    values = {"image": {"tag": "latest", "pullPolicy": "Never"}}  # everything else: the chart's defaults
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    # --wait: the workers are Ready only once registered with the broker (their readiness probe),
    # which they reached by the Service name.
    install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, "-f", values_file(tmp_path, values),
                   "--wait", "--timeout", "180s", tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=210)
    timings["helm install --wait"] = time.monotonic() - t0
    try:
        assert install.returncode == 0, install.stdout + install.stderr + describe(core, ns)
        broker_pods = ready_pods(core, ns, "broker")
        assert len(broker_pods) == 1 and len(ready_pods(core, ns, "worker")) == 2, describe(core, ns)
        # The default wiring, untouched: Pod network (no hostNetwork), the Service name as address.
        service = core.read_namespaced_service(BROKER, ns)
        assert service.spec.type == "ClusterIP" and service.spec.cluster_ip.startswith("10.235.0.")
        for pod in core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/instance={RELEASE}").items:
            assert not pod.spec.host_network and pod.status.pod_ip.startswith("10.234.0."), pod.metadata.name
        worker = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=worker").items[0]
        assert f"--connect=tcp://{BROKER}.{ns}.svc:5555" in worker.spec.containers[0].command

        t0 = time.monotonic()
        # The test Pod calls RUNNABLE_K8S_POOL, the chart's broker address (the Service name);
        # on success helm deletes it (hook-succeeded), so its log cannot be read afterwards.
        helm_test_passes(helm_bin, core, ns, tmp_path, kubeconfig)
        timings["helm test"] = time.monotonic() - t0
        hooks = helm(helm_bin, "get", "hooks", RELEASE, "-n", ns, tmp_path=tmp_path, kubeconfig=kubeconfig)
        assert f'value: "tcp://{BROKER}.{ns}.svc:5555"' in hooks.stdout, hooks.stdout + hooks.stderr

        t0 = time.monotonic()
        logs = run_to_completion(core, ns, _client_pod(ns, f"tcp://{BROKER}:5555"), timeout=150)
        timings["in-cluster client Pod"] = time.monotonic() - t0
        out = json.loads(logs.strip().splitlines()[-1])
        assert out["invoke"] == 42, out
        assert out["batches"] and all(b == [2 * x for x in range(8)] for b in out["batches"]), out
        assert len(out["pods"]) == 2 and all(p.startswith(WORKERS) for p in out["pods"]), out
    except BaseException:
        print(describe(core, ns))
        raise
    finally:
        print("timings:", {k: round(v, 1) for k, v in timings.items()})
        uninstall = helm(helm_bin, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s",
                         tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)
