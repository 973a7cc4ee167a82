"""Scaling a worker Deployment on the real test cluster (docs/design.md#scaling-and-losing-peers): DeploymentScaler and
``runnable-k8s scale`` move spec.replicas through the scale subresource, a ServiceAccount without
the verb gets a message naming it, and a broker on this host autoscales the Deployment with load.

The control plane is enough: the Deployment's Pods stay Pending (a nodeSelector nothing matches);
spec.replicas is what is scaled. In the autoscaling test the workers are local processes connected
to the broker on 127.0.0.1, so load is real and the Deployment is only the object being scaled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s
from pool.errors import ScalingError
from pool.k8s.deployment import DeploymentScaler, find_worker_deployment
from pool.scaling import scale
from tests.support.gate import open_gate, wait_at_gate
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.waiting import seconds_until, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

RELEASE = "rel"
WORKERS = "rel-worker-pool-worker"
NO_NODE = {"runnable-k8s.test/no-such-node": "true"}


def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def worker_deployment(name: str = WORKERS, release: str = RELEASE, replicas: int = 1) -> client.V1Deployment:
    labels = {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": "worker",
              "app.kubernetes.io/name": "worker-pool"}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    node_selector=NO_NODE, termination_grace_period_seconds=1,
                    automount_service_account_token=False,
                    containers=[client.V1Container(
                        name="worker", image="runnable-k8s-worker:latest", image_pull_policy="Never",
                        command=["python", "-c", "import time; time.sleep(3600)"])]))))


def replicas(apps: client.AppsV1Api, namespace: str, name: str = WORKERS) -> int:
    return int(apps.read_namespaced_deployment(name, namespace).spec.replicas)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pool", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def token_kubeconfig(cp: Any, namespace: str, account: str, path: Path) -> tuple[str, client.ApiClient]:
    """A kubeconfig file and an ApiClient that act as ``account`` (a TokenRequest token)."""
    core = cp.core()
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name=account)))
    cfg = cp.service_account_configuration(namespace, account)
    token = cfg.api_key["authorization"].split(" ", 1)[1]
    ca = cfg.ssl_ca_cert
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: sa\n"
        f"clusters: [{{name: c, cluster: {{server: '{cp.server}', certificate-authority: '{ca}'}}}}]\n"
        f"users: [{{name: sa, user: {{token: '{token}'}}}}]\n"
        f"contexts: [{{name: sa, context: {{cluster: c, user: sa, namespace: {namespace}}}}}]\n")
    return str(path), client.ApiClient(cfg)


def grant(cp: Any, namespace: str, account: str, resource: str, verbs: list[str]) -> None:
    rbac = client.RbacAuthorizationV1Api(cp.api_client)
    name = f"{account}-{resource.replace('/', '-')}"
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name=name),
        rules=[client.V1PolicyRule(api_groups=["apps"], resources=[resource], verbs=verbs)]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name=name),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=account, namespace=namespace)]))


# ---------------------------------------------------------------------------- by hand


def test_deployment_scaler_moves_replicas_through_the_scale_subresource(k8s_control_plane, k8s_namespace):
    apps = k8s_control_plane.apps()
    apps.create_namespaced_deployment(k8s_namespace, worker_deployment())
    scaler = DeploymentScaler(k8s_namespace, WORKERS, k8s_control_plane.api_client)
    assert scaler.current() == 1
    scaler.scale(3)
    assert scaler.current() == 3 and replicas(apps, k8s_namespace) == 3
    # The Deployment controller acts on it: its ReplicaSet asks for 3 Pods (Pending: no node matches).
    wait_for(lambda: sum(rs.spec.replicas for rs in apps.list_namespaced_replica_set(k8s_namespace).items) == 3,
             30, "the ReplicaSet at 3")
    scaler.scale(0)
    assert scaler.current() == 0
    with pytest.raises(ScalingError, match="not found in namespace"):
        DeploymentScaler(k8s_namespace, "no-such-deployment", k8s_control_plane.api_client).scale(1)


def test_runnable_k8s_scale_by_release_by_name_and_the_python_api(k8s_control_plane, k8s_namespace):
    apps = k8s_control_plane.apps()
    apps.create_namespaced_deployment(k8s_namespace, worker_deployment())
    # Another release's workers in the same namespace are not touched.
    apps.create_namespaced_deployment(k8s_namespace, worker_deployment("other-worker", "other"))
    kubeconfig = k8s_control_plane.kubeconfig
    assert find_worker_deployment(k8s_control_plane.api_client, k8s_namespace, RELEASE) == WORKERS

    done = cli("scale", "3", "--namespace", k8s_namespace, "--release", RELEASE, "--kubeconfig", kubeconfig)
    assert done.returncode == 0, done.stderr
    assert f"scaled deployment {k8s_namespace}/{WORKERS} to 3 replicas" in done.stdout
    assert replicas(apps, k8s_namespace) == 3 and replicas(apps, k8s_namespace, "other-worker") == 1

    done = cli("scale", "2", "-n", k8s_namespace, "--deployment", WORKERS, env={"KUBECONFIG": kubeconfig})
    assert done.returncode == 0, done.stderr
    assert replicas(apps, k8s_namespace) == 2

    scale(f"k8s://{k8s_namespace}/{RELEASE}", 1, kubeconfig=kubeconfig)
    assert replicas(apps, k8s_namespace) == 1

    missing = cli("scale", "2", "-n", k8s_namespace, "--release", "nobody", "--kubeconfig", kubeconfig)
    assert missing.returncode == 1
    assert "expected one worker Deployment of release 'nobody'" in missing.stderr and "found none" in missing.stderr


def test_a_service_account_without_the_patch_verb_gets_a_message_naming_it(k8s_control_plane, k8s_namespace,
                                                                           tmp_path):
    apps = k8s_control_plane.apps()
    apps.create_namespaced_deployment(k8s_namespace, worker_deployment())
    path, limited = token_kubeconfig(k8s_control_plane, k8s_namespace, "reader", tmp_path / "kubeconfig")
    grant(k8s_control_plane, k8s_namespace, "reader", "deployments/scale", ["get"])
    grant(k8s_control_plane, k8s_namespace, "reader", "deployments", ["list"])
    with limited:
        scaler = DeploymentScaler(k8s_namespace, WORKERS, limited)
        wait_for(lambda: _allowed(scaler.current), 15, "the Role to take effect")
        assert scaler.current() == 1
        with pytest.raises(ScalingError) as refused:
            scaler.scale(3)
        message = str(refused.value)
        assert "403 Forbidden" in message and "'patch' verb on 'deployments/scale'" in message
        assert "apiGroups: ['apps'], resources: ['deployments/scale'], verbs: ['get', 'patch']" in message

    # The namespace comes from the kubeconfig's context, as with kubectl.
    done = cli("scale", "3", "--release", RELEASE, "--kubeconfig", path)
    assert done.returncode == 1
    assert f"refused to patch deployments/scale '{WORKERS}' in namespace '{k8s_namespace}'" in done.stderr
    assert "'patch' verb on 'deployments/scale'" in done.stderr
    assert "Traceback" not in done.stderr
    assert replicas(apps, k8s_namespace) == 1

    # Without the list verb, finding a release's Deployment says so too.
    _, nolist = token_kubeconfig(k8s_control_plane, k8s_namespace, "nolist", tmp_path / "kubeconfig2")
    with nolist, pytest.raises(ScalingError, match="'list' verb on 'deployments'"):
        find_worker_deployment(nolist, k8s_namespace, RELEASE)


def _allowed(call: Callable[[], Any]) -> bool:
    try:
        call()
        return True
    except ScalingError as exc:
        if "403" not in str(exc):
            raise
        return False


# ---------------------------------------------------------------------------- with load


@pytest.mark.timeout(240)
def test_a_broker_on_this_host_autoscales_the_deployment_with_load_and_wakes_it_from_zero(
        k8s_control_plane, k8s_namespace, tmp_path):
    apps = k8s_control_plane.apps()
    apps.create_namespaced_deployment(k8s_namespace, worker_deployment())
    broker_args = [
        "--autoscale-deployment", WORKERS, "--autoscale-namespace", k8s_namespace,
        "--autoscale-min", "0", "--autoscale-max", "4", "--autoscale-target", "1",
        "--autoscale-window", "3", "--autoscale-idle", "4", "--autoscale-kubeconfig", k8s_control_plane.kubeconfig,
        "--log-level", "INFO",
    ]
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:  # the replica counts the Deployment goes through
        while not stop.is_set():
            value = replicas(apps, k8s_namespace)
            if not seen or seen[-1][1] != value:
                seen.append((time.monotonic(), value))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # One local worker of one slot: 6 calls in flight queue 5 tasks, asking for 6 workers, max 4.
        with LocalPool(workers=1, slots=1, broker_args=broker_args) as pool:
            runnable = RunnableK8s(bound=RunnableLambda(slow), pool=pool.address, mode="warm", timeout=120)
            start = time.monotonic()
            results = runnable.batch([1.0] * 6, {"max_concurrency": 6})
            assert len(results) == 6
            wait_for(lambda: any(r == 4 for _, r in seen), 10, "replicas 4")
            up = next(t for t, r in seen if r == 4) - start
            # Idle: back to 1 after the window, then 0 after 4 idle seconds.
            t_load_end = time.monotonic()
            to_zero = seconds_until(lambda: replicas(apps, k8s_namespace) == 0, 60, "scale to zero", interval=0.1)
            wait_for(lambda: seen[-1][1] == 0, 10, "the watcher to see 0")
            counts = [r for _, r in seen]
            assert counts[0] == 1 and max(counts) == 4 and counts[-2:] == [1, 0], counts

            # Wake from zero: with no worker connected, a task makes the broker scale to 1 at once; the
            # task waits in the queue until a worker (here a local process standing in for the Pod) comes.
            pool.scale(0)
            outcome: list[Any] = []
            caller = threading.Thread(target=lambda: outcome.append(runnable.invoke(0.0)))
            submitted = time.monotonic()
            caller.start()
            woke = seconds_until(lambda: replicas(apps, k8s_namespace) == 1, 20, "scale from zero", interval=0.1)
            pool.scale(1)
            caller.join(60)
            assert outcome and outcome[0] in pool.pids
    finally:
        stop.set()
        watcher.join(5)
    print(f"\nDeployment replicas went {[r for _, r in seen]}; 1 -> 4 within {up:.1f}s of the load starting, "
          f"to 0 {to_zero:.1f}s after it ended (window 3 s, idle 4 s); 0 -> 1 {woke:.2f}s after a task "
          f"arrived ({submitted - t_load_end:.0f}s into the idle period)")


# ---------------------------------------------------------------------------- real worker Pods


def pod_workers(address: str, replicas: int = 1) -> client.V1Deployment:
    """The worker image as hostNetwork Pods that connect to the broker on this host's 127.0.0.1."""
    deployment = worker_deployment(replicas=replicas)
    spec = deployment.spec.template.spec
    spec.node_selector = None
    spec.host_network = True
    spec.dns_policy = "Default"
    spec.termination_grace_period_seconds = 30  # time to drain
    spec.containers[0].command = ["python", "-m", "worker", "--connect", address, "--slots", "1"]
    spec.containers[0].env = [client.V1EnvVar(name="POD_NAME", value_from=client.V1EnvVarSource(
        field_ref=client.V1ObjectFieldSelector(field_path="metadata.name")))]
    return deployment


@pytest.mark.timeout(300)
def test_the_autoscaler_grows_real_worker_pods_with_load_and_scales_them_down_under_load_failing_nothing(
        k8s_node, k8s_namespace):
    apps = k8s_node.control_plane.apps()
    broker_args = [
        "--autoscale-deployment", WORKERS, "--autoscale-namespace", k8s_namespace,
        "--autoscale-min", "1", "--autoscale-max", "3", "--autoscale-window", "5", "--autoscale-idle", "600",
        "--autoscale-kubeconfig", k8s_node.control_plane.kubeconfig, "--log-level", "INFO",
    ]
    # Plaintext tcp on 127.0.0.1: the worker Pods (host network) connect to it, and the default
    # ipc:// socket of a LocalPool lives in a folder of this host that no Pod can see.
    with LocalPool(workers=0, secure=False, broker_args=broker_args) as pool:
        apps.create_namespaced_deployment(k8s_namespace, pod_workers(pool.address))
        first = seconds_until(lambda: len(pool.status()["workers"]) == 1, 120, "the first worker Pod to register",
                              interval=0.1)

        def pod_name(seconds: float) -> str:
            time.sleep(seconds)
            return os.environ.get("POD_NAME", "?")

        runnable = RunnableK8s(bound=RunnableLambda(lambda s: pod_name(s)), pool=pool.address, mode="warm",
                               timeout=120)
        # 8 calls at once on one slot: the autoscaler asks for 3 Pods, which register. The calls
        # wait at a gate the test opens only once all three Pods run one each: with calls of a
        # fixed length the load could fall before a slow Pod registered, and the 5 s window let
        # the count drop below 3 before the test saw three workers.
        gate_port = free_port()
        gated = RunnableK8s(bound=RunnableLambda(wait_at_gate(gate_port)), pool=pool.address, mode="warm",
                            timeout=280)
        served: list[Any] = []
        batch = threading.Thread(target=lambda: served.extend(gated.batch(list(range(8)), {"max_concurrency": 8})))
        batch.start()
        try:
            grew = seconds_until(lambda: len(pool.status()["workers"]) == 3, 150, "3 worker Pods registered",
                                 interval=0.1)
            wait_for(lambda: pool.status()["busy"] == 3, 30, "a call running on each of the 3 Pods", interval=0.1)
            assert replicas(apps, k8s_namespace) == 3
        finally:
            with open_gate(gate_port):
                batch.join(120)
        assert [x for x, _ in served] == list(range(8))
        names = [pod for _, pod in served]
        assert len(set(names)) == 3 and all(n.startswith(WORKERS) for n in names), names

        # One call at a time needs one worker: 3 -> 1 after the 5 s window, while calls keep coming.
        results: list[Any] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                try:
                    results.append(runnable.invoke(0.05))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

        caller = threading.Thread(target=trickle)
        caller.start()
        try:
            shrank = seconds_until(lambda: replicas(apps, k8s_namespace) == 1, 60, "scale down to 1", interval=0.1)
            wait_for(lambda: len(pool.status()["workers"]) == 1, 60, "2 Pods to drain and leave")
            time.sleep(1)
        finally:
            stop.set()
            caller.join(30)
        counters = pool.status()["counters"]
        assert errors == [] and len(results) > 20
        assert counters["failed"] == 0 and counters["workers_lost"] == 0, counters
        apps.delete_namespaced_deployment(WORKERS, k8s_namespace)
    print(f"\nreal worker Pods: the first registered {first:.1f}s after the Deployment was created; 1 -> 3 Pods "
          f"registered {grew:.1f}s after 8 calls arrived; 3 -> 1 {shrank:.1f}s into a trickle of {len(results)} "
          f"calls (window 5 s), none failed")
