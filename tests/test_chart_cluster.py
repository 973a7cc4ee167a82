"""The worker-pool chart on the real single-node test cluster (tests/cluster): helm install with
CurveZMQ keys split into one Secret per role (a client added and revoked with no broker restart),
warm calls from the host, worker concurrency, helm test, scaling the
worker Deployment through its scale subresource (scale-down drains), helm uninstall; and the
autoscaler's RBAC, least privilege, with a real ServiceAccount token; and the broker Pod's
autoscaler moving the worker Deployment with load, with metrics served on the metrics port.

Most tests here run the broker with hostNetwork on a free host port, so that this test process on
the host reaches it at tcp://127.0.0.1:PORT, and the workers and the helm test Pod (hostNetwork too)
reach it there as well (see charts/worker-pool/README.md, "On the project's test cluster"); the
chart's default wiring through its Service is tests/test_chart_services_cluster.py's, and the
k8s:// test below. The worker image there is built from this checkout, so lambdas travel by value.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s
from pool.client.connection import Connection
from pool.errors import RunnableK8sError
from pool.keys import add_client, create_key_directory, is_allow_list, key_secret_manifests, revoke_client
from tests.support.chart_release import (
    COMPONENT,
    RELEASE,
    WORKERS,
    assert_nothing_left,
    create_key_secrets,
    describe,
    helm_test_passes,
    pods_left,
    ready_pods,
    require_health_dir,
)
from tests.support.gate import open_gate, wait_at_gate
from tests.support.helm import CHART, helm, values_file
from tests.support.ports import free_port
from tests.support.waiting import wait_for
from worker.curve import load_peer_keys

pytestmark = pytest.mark.cluster


def sleep_and_time(seconds: float):
    """A task that sleeps and returns (input, start, end) on the worker's monotonic clock. Nested, so
    it travels by value (the worker image has no tests package)."""

    def task(x):
        import time

        start = time.monotonic()
        time.sleep(seconds)
        return x, start, time.monotonic()

    return task


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals that overlap at one moment."""
    return max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)


def readiness_failures(core, namespace: str) -> int:
    """How often the kubelet found a worker Pod not ready, by the Pods' events (each failed
    readiness probe is a Warning "Unhealthy" event; repeats of one are counted in its count)."""
    return sum(event.count or 1 for event in core.list_namespaced_event(namespace).items
               if event.reason == "Unhealthy" and event.involved_object.kind == "Pod"
               and (event.involved_object.name or "").startswith(WORKERS)
               and "Readiness probe failed" in (event.message or ""))


def replace_allow_lists(core, namespace: str, prefix: str, tree: Path) -> None:
    """What a re-run of `runnable-k8s keys TREE --k8s-secret PREFIX` does after --client/--revoke."""
    for manifest in key_secret_manifests(tree, prefix):
        name = manifest["metadata"]["name"]
        if is_allow_list(manifest):
            core.replace_namespaced_secret(name, namespace, manifest)
        elif name not in {s.metadata.name for s in core.list_namespaced_secret(namespace).items}:
            core.create_namespaced_secret(namespace, manifest)


def key_files_seen_by_the_worker():
    """A task for a worker Pod (a warm call): what it can see of the keys, as the kubelet mounted
    them. Nested, so it travels by value (the worker image has no tests package)."""

    def task(_):
        import os

        base = "/etc/runnable-k8s"
        data = os.path.join(base, "keys", "..data")
        files = {}
        for name in sorted(os.listdir(data)):
            info = os.stat(os.path.join(data, name))
            files[name] = {"mode": oct(info.st_mode & 0o777), "uid": info.st_uid, "gid": info.st_gid}
        return {"mounts": sorted(os.listdir(base)), "files": files, "uid": os.getuid(), "groups": os.getgroups()}

    return task


def registered_workers(status_connection: Connection) -> int:
    return sum(1 for w in status_connection.status()["workers"] if not w.get("draining"))


def scale(apps, namespace: str, replicas: int) -> None:
    apps.patch_namespaced_deployment_scale(WORKERS, namespace, {"spec": {"replicas": replicas}})


@pytest.mark.timeout(420)
def test_the_chart_runs_a_keyed_warm_pool_that_scales_and_drains(helm_bin, k8s_node, k8s_namespace, tmp_path):
    cp = k8s_node.control_plane
    core, apps, ns, kubeconfig = cp.core(), cp.apps(), k8s_namespace, cp.kubeconfig
    tree = create_key_directory(tmp_path / "keys")
    keys = create_key_secrets(core, ns, "pool-keys", tree)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    require_health_dir(core, ns)
    values = {
        "image": {"repository": "runnable-k8s-worker", "tag": "latest", "pullPolicy": "Never"},
        "curve": {"enabled": True, "existingSecret": "pool-keys"},
        "broker": {"hostNetwork": True, "port": port, "logLevel": "DEBUG",
                   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
        "worker": {"hostNetwork": True, "brokerAddress": address, "replicas": 1, "concurrency": 2,
                   "gracePeriodSeconds": 20, "probes": {"enabled": True},
                   "extraEnv": [{"name": "GREETING", "value": "hello from the chart"}],
                   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
        "tests": {"hostNetwork": True, "timeout": 60},
    }
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, "-f", values_file(tmp_path, values),
                   "--wait", "--timeout", "120s", tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    timings["install --wait"] = time.monotonic() - t0
    assert install.returncode == 0, install.stdout + install.stderr + describe(core, ns)
    status = None
    try:
        assert f'k8s://{ns}/{RELEASE}' in install.stdout  # NOTES: how to connect from a laptop
        # The Service and broker Pods carry what `k8s://NS/RELEASE` clients look for.
        services = core.list_namespaced_service(ns, label_selector=COMPONENT.format(release=RELEASE,
                                                                                    component="broker")).items
        assert [s.metadata.name for s in services] == [f"{RELEASE}-worker-pool-broker"]
        assert [p.name for p in services[0].spec.ports] == ["zmq"]
        assert ready_pods(core, ns, "broker"), describe(core, ns)

        # The workers registered with the broker (with CurveZMQ worker keys from the Secret).
        status = Connection(address, load_peer_keys(keys, "client"), 10.0)
        wait_for(lambda: registered_workers(status) == 1, 60, "one registered worker", interval=0.5)
        # Readiness means registered: the Pod is Ready once the broker has it.
        wait_for(lambda: len(ready_pods(core, ns, "worker")) == 1, 60, "a Ready worker Pod", interval=0.5)

        # A warm call from the host, through the chart's broker, with the client keys.
        remote = RunnableK8s(bound=RunnableLambda(lambda x: {"double": x * 2, "env": __import__("os").environ[
            "GREETING"], "pod": __import__("os").environ["POD_NAME"]}), pool=address, keys=str(keys), mode="warm",
            timeout=60)
        t0 = time.monotonic()
        first = remote.invoke(21)
        timings["first warm call"] = time.monotonic() - t0
        assert first["double"] == 42 and first["env"] == "hello from the chart"
        assert first["pod"].startswith(WORKERS)

        # Worker concurrency is real and bounded: 4 one-second tasks on one worker of concurrency 2
        # run two at a time (their start and end times, on the worker's clock, overlap by twos).
        sleepy = RunnableK8s(bound=RunnableLambda(sleep_and_time(1.0)), pool=address, keys=str(keys), mode="warm",
                             timeout=60)
        sleepy.invoke(0)  # the runnable reaches the worker's cache first
        t0 = time.monotonic()
        timed = sleepy.batch([1, 2, 3, 4])
        timings["4 x 1 s on 1 worker of concurrency 2"] = time.monotonic() - t0
        assert [x for x, _, _ in timed] == [1, 2, 3, 4]
        assert most_at_once([(start, end) for _, start, end in timed]) == 2, timed

        # The keys are really enforced: a client without them is refused.
        with pytest.raises(RunnableK8sError):
            RunnableK8s(bound=RunnableLambda(lambda x: x), pool=address, mode="warm", timeout=10,
                        connect_timeout=10).invoke(1)

        # helm test: the hook Pod makes a real call through the pool, with the client keys.
        t0 = time.monotonic()
        helm_test_passes(helm_bin, core, ns, tmp_path, kubeconfig)
        timings["helm test"] = time.monotonic() - t0
        assert not pods_left(core, ns, "test")  # a passed test Pod is deleted (hook-succeeded)

        # Keys per role, as the kubelet mounted them: the worker Pod has its own Secret only, its
        # files root-owned with the Pod's fsGroup, readable by no other user (0440).
        seen = RunnableK8s(bound=RunnableLambda(key_files_seen_by_the_worker()), pool=address,
                           keys=str(keys), mode="warm", timeout=60).invoke(None)
        print("worker key files as mounted:", seen)
        assert seen["mounts"] == ["keys"], seen  # no client-keys, no worker-keys: the broker's only
        assert set(seen["files"]) == {"worker.key", "worker.key_secret", "broker.key"}, seen
        secret_file = seen["files"]["worker.key_secret"]
        assert secret_file["uid"] == 0 and secret_file["gid"] == 10001, seen
        assert int(secret_file["mode"], 8) & 0o037 == 0, seen  # nobody outside the group; group read-only

        # Adding a client with no broker restart: its key reaches the broker through the replaced
        # PREFIX-clients Secret (the kubelet refreshes the volume, the broker re-reads the folder).
        broker_pods = ready_pods(core, ns, "broker")
        added = add_client(tree, "web")
        replace_allow_lists(core, ns, "pool-keys", tree)
        t0 = time.monotonic()
        web = RunnableK8s(bound=RunnableLambda(lambda x: x + 1), pool=address, keys=str(added), mode="warm",
                          timeout=30, connect_timeout=5)

        def web_is_served() -> bool:
            Connection.close_all(address)
            try:
                return web.invoke(1) == 2
            except RunnableK8sError:
                return False

        wait_for(web_is_served, 150, "the added client to be allowed by the running broker", interval=2)
        timings["added client allowed after"] = time.monotonic() - t0
        # Revoking it: refused again, the broker Pod still the same one.
        kept = tmp_path / "web-copy"
        shutil.copytree(added, kept)
        revoke_client(tree, "web")
        replace_allow_lists(core, ns, "pool-keys", tree)
        t0 = time.monotonic()
        revoked = RunnableK8s(bound=RunnableLambda(lambda x: x + 1), pool=address, keys=str(kept), mode="warm",
                              timeout=30, connect_timeout=5)

        def revoked_is_refused() -> bool:
            Connection.close_all(address)
            try:
                revoked.invoke(1)
            except RunnableK8sError:
                return True
            return False

        wait_for(revoked_is_refused, 150, "the revoked client to be refused by the running broker", interval=2)
        timings["revoked client refused after"] = time.monotonic() - t0
        assert ready_pods(core, ns, "broker") == broker_pods  # no restart
        assert RunnableK8s(bound=RunnableLambda(lambda x: x + 1), pool=address, keys=str(keys), mode="warm",
                           timeout=30).invoke(1) == 2  # the other client is untouched

        # Scale 1 -> 3 with `runnable-k8s scale --release` (it finds the worker Deployment by the
        # chart's labels and uses the scale subresource): three workers serve.
        t0 = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "pool", "scale", "3", "--release", RELEASE, "-n", ns,
                              "--kubeconfig", kubeconfig], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas == 3
        wait_for(lambda: registered_workers(status) == 3, 90, "three registered workers", interval=0.5)
        wait_for(lambda: len(ready_pods(core, ns, "worker")) == 3, 60, "three Ready worker Pods", interval=0.5)
        timings["scale 1 -> 3"] = time.monotonic() - t0
        where = RunnableK8s(bound=RunnableLambda(lambda x: (__import__("time").sleep(2.0),
                                                           __import__("os").environ["POD_NAME"])[1]),
                            pool=address, keys=str(keys), mode="warm", timeout=90)
        pods = where.batch(list(range(6)))  # 6 slots: every worker takes two
        assert len(set(pods)) == 3, pods

        # Scale 3 -> 1 through the scale subresource while six four-second tasks run: the stopped
        # workers drain, no call fails.
        results: dict[str, object] = {}
        slow = RunnableK8s(bound=RunnableLambda(lambda x: (__import__("time").sleep(4.0), x)[1]), pool=address,
                           keys=str(keys), mode="warm", timeout=90)
        runner = threading.Thread(target=lambda: results.update(out=slow.batch(list(range(6)),
                                                                               return_exceptions=True)))
        runner.start()
        wait_for(lambda: status.status()["busy"] == 6, 30, "six busy slots", interval=0.1)
        t0 = time.monotonic()
        scale(apps, ns, 1)
        runner.join(120)
        assert results.get("out") == list(range(6)), results
        wait_for(lambda: len(pods_left(core, ns, "worker")) == 1, 90, "one worker Pod left", interval=0.5)
        wait_for(lambda: registered_workers(status) == 1, 30, "one registered worker", interval=0.5)
        timings["scale 3 -> 1 under load"] = time.monotonic() - t0
        assert remote.invoke(5)["double"] == 10  # and the pool keeps serving
        # No container was restarted: in particular the liveness probe never failed a working worker.
        restarts = {p.metadata.name: [c.restart_count for c in p.status.container_statuses or []]
                    for p in core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/instance={RELEASE}").items}
        assert all(n == 0 for counts in restarts.values() for n in counts), restarts
    except BaseException:
        print(describe(core, ns))
        raise
    finally:
        print("timings:", {k: round(v, 2) for k, v in timings.items()})
        if status is not None:
            status.close()
        Connection.close_all(address)
        t0 = time.monotonic()
        uninstall = helm(helm_bin, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s",
                         tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
        print(f"helm uninstall took {time.monotonic() - t0:.1f}s")
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)


@pytest.mark.timeout(360)
def test_the_brokers_autoscaler_scales_the_workers_with_load_and_serves_metrics(helm_bin, k8s_node, k8s_namespace,
                                                                                tmp_path):
    """autoscaling.enabled: the broker Pod, with its own ServiceAccount and the chart's Role (nothing
    more), sets the worker Deployment's replicas from its queue; metrics.enabled: Prometheus text
    on the metrics port. (No kube-proxy here: the broker reaches the API server on the host's
    loopback, so KUBERNETES_SERVICE_HOST/PORT point there.)"""
    cp = k8s_node.control_plane
    core, apps, ns, kubeconfig = cp.core(), cp.apps(), k8s_namespace, cp.kubeconfig
    tree = create_key_directory(tmp_path / "keys")
    keys = create_key_secrets(core, ns, "pool-keys", tree)
    require_health_dir(core, ns)
    port, metrics_port, gate_port = free_port(), free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    api = urlparse(cp.server)
    values = {
        "image": {"repository": "runnable-k8s-worker", "tag": "latest", "pullPolicy": "Never"},
        "curve": {"enabled": True, "existingSecret": "pool-keys"},
        "broker": {"hostNetwork": True, "port": port, "logLevel": "INFO",
                   "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": api.hostname},
                                {"name": "KUBERNETES_SERVICE_PORT", "value": str(api.port)}],
                   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
        "worker": {"hostNetwork": True, "brokerAddress": address, "concurrency": 2, "gracePeriodSeconds": 20,
                   "probes": {"enabled": True},
                   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetTasksPerSlot": 1.0,
                        "stabilizationWindowSeconds": 5, "scaleToZeroIdleSeconds": 600},
        "metrics": {"enabled": True, "port": metrics_port},
    }
    timings: dict[str, float] = {}
    install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, "-f", values_file(tmp_path, values),
                   "--wait", "--timeout", "120s", tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    assert install.returncode == 0, install.stdout + install.stderr + describe(core, ns)
    status = None
    try:
        status = Connection(address, load_peer_keys(keys, "client"), 10.0)
        wait_for(lambda: registered_workers(status) == 1, 60, "one registered worker", interval=0.5)
        # Metrics: the broker's own numbers, scraped the way Prometheus would (the Pod's port).
        text = wait_for(lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), 30, "the metrics endpoint",
                        interval=0.5)
        assert "runnable_k8s_" in text and "runnable_k8s_tasks" in text, text[:2000]

        # Load: 6 tasks on one worker of 2 slots call for 3 workers. The tasks last until the test
        # opens their gate, not a fixed time: the load must hold until the new Pods have registered
        # and taken the queued tasks however slowly they start (with tasks of a fixed 8 s, a Pod
        # that took more than ~13 s to register met a load already falling, and the autoscaler
        # scaled back down after its 5 s window before it ever counted three workers).
        results: dict[str, object] = {}
        gated = RunnableK8s(bound=RunnableLambda(wait_at_gate(gate_port)), pool=address, keys=str(keys),
                            mode="warm", timeout=280)
        runner = threading.Thread(target=lambda: results.update(out=gated.batch(list(range(6)),
                                                                                return_exceptions=True)))
        t0 = time.monotonic()
        runner.start()
        try:
            wait_for(lambda: apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas == 3, 60,
                     "the autoscaler to ask for 3 workers", interval=0.5)
            timings["load -> replicas 3"] = time.monotonic() - t0
            wait_for(lambda: registered_workers(status) == 3, 150, "three registered workers", interval=0.5)
            timings["load -> 3 workers registered"] = time.monotonic() - t0
            # The new workers took the queued tasks: all six run at once.
            wait_for(lambda: status.status()["busy"] == 6, 30, "six busy slots over three workers", interval=0.2)
            assert apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas == 3  # held under load
        finally:
            with open_gate(gate_port):  # the tasks return
                runner.join(150)
        assert [r[0] if isinstance(r, tuple) else r for r in results.get("out") or []] == list(range(6)), results

        # Idle: back to minReplicas after the stabilization window; nothing was lost meanwhile.
        t0 = time.monotonic()
        wait_for(lambda: apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas == 1, 90,
                 "the autoscaler to go back to 1 worker", interval=0.5)
        timings["idle -> replicas 1"] = time.monotonic() - t0
        wait_for(lambda: len(pods_left(core, ns, "worker")) == 1, 90, "one worker Pod left", interval=0.5)
        # Every scale went through with the broker's own ServiceAccount: no refusal was logged. (Not a
        # bare "403": the log's millisecond timestamps, ports, PIDs and worker ids contain it by chance.)
        logs = core.read_namespaced_pod_log(pods_left(core, ns, "broker")[0], ns)
        assert "autoscaler cannot scale" not in logs and "Forbidden" not in logs, logs[-3000:]
    except BaseException:
        print(describe(core, ns))
        raise
    finally:
        print("timings:", {k: round(v, 2) for k, v in timings.items()})
        if status is not None:
            status.close()
        Connection.close_all(address)
        uninstall = helm(helm_bin, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s",
                         tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


@pytest.mark.timeout(300)
def test_a_pod_network_broker_is_reached_from_the_host_through_k8s_address(helm_bin, k8s_node, k8s_namespace,
                                                                          tmp_path):
    """The default wiring, without hostNetwork: the broker in its own Pod network namespace, found
    by `pool="k8s://NAMESPACE/RELEASE"` from the host (a port-forward through the API server, by the
    chart's labels and port name). The workers start pointed at an address where no broker listens,
    and with the worker's --health-dir they are not Ready; a helm upgrade then gives them the chart's
    default address (the broker Service's name, resolved by the cluster's DNS) and they serve."""
    cp = k8s_node.control_plane
    core, ns, kubeconfig = cp.core(), k8s_namespace, cp.kubeconfig
    tree = create_key_directory(tmp_path / "keys")
    keys = create_key_secrets(core, ns, "pool-keys", tree)
    require_health_dir(core, ns)
    values = {
        "image": {"repository": "runnable-k8s-worker", "tag": "latest", "pullPolicy": "Never"},
        "curve": {"enabled": True, "existingSecret": "pool-keys"},
        "broker": {"resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
        # First pointed at a port where no broker listens.
        "worker": {"replicas": 1, "concurrency": 2, "gracePeriodSeconds": 5, "brokerAddress": "tcp://127.0.0.1:9",
                   "probes": {"enabled": True}, "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
    }
    vf = values_file(tmp_path, values)
    install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, "-f", vf,
                   tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    assert install.returncode == 0, install.stdout + install.stderr + describe(core, ns)
    address = f"k8s://{ns}/{RELEASE}"
    try:
        wait_for(lambda: ready_pods(core, ns, "broker"), 90, "a Ready broker Pod", interval=0.5)
        broker_pod = core.read_namespaced_pod(ready_pods(core, ns, "broker")[0], ns)
        assert not broker_pod.spec.host_network and broker_pod.status.pod_ip.startswith("10.234.0.")
        # Readiness means "registered with a broker": a worker without one never gets Ready.
        wait_for(lambda: any(
            c.state.running for p in core.list_namespaced_pod(
                ns, label_selector=COMPONENT.format(release=RELEASE, component="worker")).items
            for c in p.status.container_statuses or []), 60, "the worker container to run", interval=0.5)
        wait_for(lambda: readiness_failures(core, ns) >= 2, 60, "the kubelet to find the worker not ready twice",
                 interval=0.5)
        assert not ready_pods(core, ns, "worker"), describe(core, ns)
        upgrade = helm(helm_bin, "upgrade", RELEASE, str(CHART), "-n", ns, "-f", vf, "--set", "worker.replicas=2",
                       "--set", "worker.brokerAddress=", "--wait",
                       "--timeout", "120s", tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr + describe(core, ns)
        assert len(ready_pods(core, ns, "worker")) == 2
        assert ready_pods(core, ns, "broker") == [broker_pod.metadata.name]  # the broker was not restarted

        remote = RunnableK8s(bound=RunnableLambda(lambda x: (__import__("time").sleep(1.0),
                                                             __import__("os").environ["POD_NAME"])[1]),
                             pool=address, keys=str(keys), k8s_config=kubeconfig, mode="warm", timeout=60,
                             connect_timeout=20)
        deadline = time.monotonic() + 60
        pods: set[str] = set()
        while len(pods) < 2 and time.monotonic() < deadline:  # both workers registered and serving
            pods |= set(remote.batch([0, 1, 2, 3]))
        assert len(pods) == 2 and all(p.startswith(WORKERS) for p in pods), pods

        helm_test_passes(helm_bin, core, ns, tmp_path, kubeconfig)
    except BaseException:
        print(describe(core, ns))
        raise
    finally:
        Connection.close_all()
        from pool.k8s.portforward import BrokerForward

        for forward in list(BrokerForward._shared.values()):
            forward.close()
        uninstall = helm(helm_bin, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s",
                         tmp_path=tmp_path, kubeconfig=kubeconfig, timeout=150)
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)


@pytest.mark.timeout(180)
def test_the_autoscaler_role_allows_scaling_its_own_workers_and_nothing_else(helm_bin, k8s_control_plane,
                                                                              k8s_namespace, tmp_path):
    """With autoscaling on, the broker's ServiceAccount may read and scale this release's worker
    Deployment, and nothing else (checked with a real token of that account)."""
    from kubernetes import client

    cp, ns = k8s_control_plane, k8s_namespace
    apps = cp.apps()
    values = {
        "image": {"tag": "latest", "pullPolicy": "Never"},
        "curve": {"enabled": True, "existingSecret": "absent"},  # the Pods need not run here
        "broker": {"nodeSelector": {"runnable-k8s.test/no-such-node": "true"}},
        "worker": {"nodeSelector": {"runnable-k8s.test/no-such-node": "true"}},
        "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 4},
        "networkPolicy": {"enabled": True}, "metrics": {"enabled": True},
    }
    install = helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, "-f", values_file(tmp_path, values),
                   tmp_path=tmp_path, kubeconfig=cp.kubeconfig)
    assert install.returncode == 0, install.stdout + install.stderr
    other = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="someone-else"),
        spec=client.V1DeploymentSpec(
            replicas=0, selector=client.V1LabelSelector(match_labels={"app": "someone-else"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "someone-else"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="none")]))))
    apps.create_namespaced_deployment(ns, other)
    as_broker = client.ApiClient(cp.service_account_configuration(ns, f"{RELEASE}-worker-pool-broker"))
    try:
        broker_apps = client.AppsV1Api(as_broker)
        # Allowed (the RBAC authorizer's cache may need a moment): read and scale its own workers.
        wait_for(lambda: _allowed(lambda: broker_apps.read_namespaced_deployment_scale(
            WORKERS, ns)), 20, "the Role to take effect", interval=0.5)
        broker_apps.patch_namespaced_deployment_scale(WORKERS, ns, {"spec": {"replicas": 3}})
        assert broker_apps.read_namespaced_deployment(WORKERS, ns).spec.replicas == 3
        assert broker_apps.read_namespaced_deployment_scale(WORKERS, ns).spec.replicas == 3
        # Refused: anyone else's Deployment, changing the Deployment itself, listing, Pods.
        refused = [
            lambda: broker_apps.patch_namespaced_deployment_scale("someone-else", ns, {"spec": {"replicas": 1}}),
            lambda: broker_apps.read_namespaced_deployment("someone-else", ns),
            lambda: broker_apps.patch_namespaced_deployment(WORKERS, ns, {"spec": {"paused": True}}),
            lambda: broker_apps.list_namespaced_deployment(ns),
            lambda: client.CoreV1Api(as_broker).list_namespaced_pod(ns),
            lambda: client.CoreV1Api(as_broker).read_namespaced_secret("absent", ns),
        ]
        for call in refused:
            with pytest.raises(client.ApiException) as exc:
                call()
            assert exc.value.status == 403
    finally:
        as_broker.close()
        uninstall = helm(helm_bin, "uninstall", RELEASE, "-n", ns, tmp_path=tmp_path, kubeconfig=cp.kubeconfig)
    assert uninstall.returncode == 0, uninstall.stderr
    assert_nothing_left(cp, ns)


def _allowed(call) -> bool:
    from kubernetes import client

    try:
        call()
        return True
    except client.ApiException as exc:
        if exc.status != 403:
            raise
        return False
