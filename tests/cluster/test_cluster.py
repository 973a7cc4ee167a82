"""The test cluster itself, checked through the same fixtures issues 4 and 5 use.

Control-plane tier: Pods without a node (create / watch / delete), the Deployment scale
subresource, RBAC refusals, helm install.  Node tier: a real Pod of the worker image attached
through the API, a Deployment of it scaled 1 -> 3 -> 1, port-forward, a hostNetwork Pod
reaching a server on the host's 127.0.0.1, and the Pod network's isolation.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

NO_NODE = {"runnable-k8s.test/no-such-node": "true"}  # keeps Pods Pending on the control plane alone


def _k8s():
    from kubernetes import client
    return client


def _pod(name, command, *, stdin=False, host_network=False, image="runnable-k8s-worker:latest",
         node_selector=None, labels=None, ports=None):
    client = _k8s()
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {"app": name}),
        spec=client.V1PodSpec(
            restart_policy="Never", host_network=host_network, node_selector=node_selector,
            termination_grace_period_seconds=1, automount_service_account_token=False,
            containers=[client.V1Container(
                name="main", image=image, image_pull_policy="Never", command=command,
                stdin=stdin, stdin_once=stdin, tty=False,
                ports=[client.V1ContainerPort(container_port=p) for p in (ports or [])])]))


def _wait_running(core, name, ns, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        pod = core.read_namespaced_pod(name, ns)
        if pod.status.phase == "Running":
            return pod
        if pod.status.phase in ("Failed", "Succeeded"):
            raise AssertionError(f"pod {name} ended: {pod.status}")
        time.sleep(0.3)
    raise AssertionError(f"pod {name} not Running after {timeout}s: {core.read_namespaced_pod(name, ns).status}")


def _pod_logs(core, name, ns):
    try:
        return core.read_namespaced_pod_log(name, ns)
    except Exception as e:  # noqa: BLE001
        return f"<no logs: {e}>"


# ------------------------------------------------------------------ control-plane tier
def test_pod_create_watch_delete_without_node(k8s_control_plane, k8s_namespace):
    from kubernetes import watch
    core = k8s_control_plane.core()
    core.create_namespaced_pod(k8s_namespace, _pod("pending", ["true"], node_selector=NO_NODE))
    seen = []
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_pod, k8s_namespace, timeout_seconds=20):
        seen.append(ev["type"])
        if ev["type"] == "ADDED":
            core.delete_namespaced_pod("pending", k8s_namespace, grace_period_seconds=0)
        if ev["type"] == "DELETED":
            w.stop()
    assert seen[0] == "ADDED" and seen[-1] == "DELETED", seen


def test_deployment_scale_subresource(k8s_control_plane, k8s_namespace):
    client = _k8s()
    apps = k8s_control_plane.apps()
    dep = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="scaled"),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels={"app": "scaled"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "scaled"}),
                spec=_pod("x", ["sleep", "1"], node_selector=NO_NODE).spec)))
    dep.spec.template.spec.restart_policy = "Always"
    apps.create_namespaced_deployment(k8s_namespace, dep)
    apps.patch_namespaced_deployment_scale("scaled", k8s_namespace, {"spec": {"replicas": 3}})
    assert apps.read_namespaced_deployment_scale("scaled", k8s_namespace).spec.replicas == 3
    # The controller-manager acts on it: the ReplicaSet wants 3 Pods (Pending: no node here).
    deadline = time.time() + 30
    while time.time() < deadline:
        rss = apps.list_namespaced_replica_set(k8s_namespace).items
        pods = k8s_control_plane.core().list_namespaced_pod(k8s_namespace).items
        if rss and rss[0].spec.replicas == 3 and len(pods) == 3:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the Deployment controller did not create 3 Pods")


def test_rbac_refuses_a_service_account_without_the_verb(k8s_control_plane, k8s_namespace):
    client = _k8s()
    core = k8s_control_plane.core()
    rbac = client.RbacAuthorizationV1Api(k8s_control_plane.api_client)
    core.create_namespaced_service_account(k8s_namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="limited")))
    cfg = k8s_control_plane.service_account_configuration(k8s_namespace, "limited")
    with client.ApiClient(cfg) as limited:
        lcore = client.CoreV1Api(limited)
        with pytest.raises(client.ApiException) as exc:
            lcore.create_namespaced_pod(k8s_namespace, _pod("nope", ["true"], node_selector=NO_NODE))
        assert exc.value.status == 403
        assert 'cannot create resource "pods"' in json.loads(exc.value.body)["message"]
        rbac.create_namespaced_role(k8s_namespace, client.V1Role(
            metadata=client.V1ObjectMeta(name="pods"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["create", "get", "delete"])]))
        rbac.create_namespaced_role_binding(k8s_namespace, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="pods"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pods"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="limited", namespace=k8s_namespace)]))
        deadline = time.time() + 10
        while True:  # the RBAC authorizer's cache catches up within moments
            try:
                lcore.create_namespaced_pod(k8s_namespace, _pod("yes", ["true"], node_selector=NO_NODE))
                break
            except client.ApiException as e:
                if e.status != 403 or time.time() > deadline:
                    raise
                time.sleep(0.2)


def _trivial_chart(root: Path) -> Path:
    chart = root / "trivial"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: trivial\ndescription: A trivial chart for the test cluster\n"
        "type: application\nversion: 0.1.0\nappVersion: \"1.0\"\nicon: https://example.invalid/icon.png\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "  labels:\n    app.kubernetes.io/instance: {{ .Release.Name }}\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n")
    return chart


def _helm(helm_bin, *args, tmp_path, kubeconfig=None, timeout=60):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HELM_CACHE_HOME": str(tmp_path / "cache"),
           "HELM_CONFIG_HOME": str(tmp_path / "config"), "HELM_DATA_HOME": str(tmp_path / "data")}
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return subprocess.run([helm_bin, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_helm_lint_and_template(helm_bin, tmp_path):
    chart = _trivial_chart(tmp_path)
    lint = _helm(helm_bin, "lint", "--strict", str(chart), tmp_path=tmp_path)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    tpl = _helm(helm_bin, "template", "rel", str(chart), "--set", "greeting=hi", tmp_path=tmp_path)
    assert tpl.returncode == 0, tpl.stderr
    assert "name: rel-cm" in tpl.stdout and 'greeting: "hi"' in tpl.stdout


def test_helm_install_on_the_control_plane(helm_bin, k8s_control_plane, k8s_namespace, tmp_path):
    chart = _trivial_chart(tmp_path)
    kc = k8s_control_plane.kubeconfig
    inst = _helm(helm_bin, "install", "rel", str(chart), "-n", k8s_namespace, "--wait", "--timeout", "30s",
                 tmp_path=tmp_path, kubeconfig=kc)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    cm = k8s_control_plane.core().read_namespaced_config_map("rel-cm", k8s_namespace)
    assert cm.data == {"greeting": "hello"}
    ls = _helm(helm_bin, "list", "-n", k8s_namespace, "-q", tmp_path=tmp_path, kubeconfig=kc)
    assert ls.stdout.split() == ["rel"]
    un = _helm(helm_bin, "uninstall", "rel", "-n", k8s_namespace, tmp_path=tmp_path, kubeconfig=kc)
    assert un.returncode == 0, un.stderr


# --------------------------------------------------------------------------- node tier
ECHO_UPPER = ["python3", "-c", "import sys, importlib.util as u; line = sys.stdin.readline(); "
              "print('echo:' + line.strip().upper(), 'worker:', u.find_spec('worker') is not None, flush=True)"]


def test_attach_to_a_worker_image_pod(k8s_node, k8s_namespace):
    from kubernetes.stream import stream
    core = k8s_node.control_plane.core()
    core.create_namespaced_pod(k8s_namespace, _pod("attach", ECHO_UPPER, stdin=True))
    try:
        _wait_running(core, "attach", k8s_namespace)
        ws = stream(core.connect_get_namespaced_pod_attach, "attach", k8s_namespace,
                    stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
        try:
            ws.write_stdin("hello cluster\n")
            out, err = "", ""
            deadline = time.time() + 30
            while ws.is_open() and "\n" not in out and time.time() < deadline:
                ws.update(timeout=1)
                out += ws.read_stdout() or ""
                err += ws.read_stderr() or ""
        finally:
            ws.close()
        assert out.strip() == "echo:HELLO CLUSTER worker: True", (out, err, _pod_logs(core, "attach", k8s_namespace))
    finally:
        core.delete_namespaced_pod("attach", k8s_namespace, grace_period_seconds=0)
    deadline = time.time() + 30
    while time.time() < deadline:
        if not [p for p in core.list_namespaced_pod(k8s_namespace).items if p.metadata.name == "attach"]:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("pod not deleted")


@pytest.mark.timeout(180)
def test_worker_deployment_scales_1_3_1(k8s_node, k8s_namespace):
    client = _k8s()
    apps = k8s_node.control_plane.apps()
    tmpl = _pod("w", ["python3", "-c", "import signal; signal.pause()"]).spec
    tmpl.restart_policy = "Always"
    tmpl.containers[0].readiness_probe = client.V1Probe(
        _exec=client.V1ExecAction(command=["python3", "-c", "import importlib.util as u, sys; "
                                            "sys.exit(u.find_spec('worker') is None)"]),
        period_seconds=2, initial_delay_seconds=0)
    apps.create_namespaced_deployment(k8s_namespace, client.V1Deployment(
        metadata=client.V1ObjectMeta(name="workers"),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels={"app": "workers"}),
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={"app": "workers"}),
                                              spec=tmpl))))

    def wait_ready(n, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            d = apps.read_namespaced_deployment("workers", k8s_namespace)
            pods = [p for p in k8s_node.control_plane.core().list_namespaced_pod(
                k8s_namespace, label_selector="app=workers").items if not p.metadata.deletion_timestamp]
            if (d.status.ready_replicas or 0) == n and (d.status.replicas or 0) == n and len(pods) == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"deployment not at {n} ready replicas: {d.status}")

    wait_ready(1)
    apps.patch_namespaced_deployment_scale("workers", k8s_namespace, {"spec": {"replicas": 3}})
    wait_ready(3)
    apps.patch_namespaced_deployment_scale("workers", k8s_namespace, {"spec": {"replicas": 1}})
    wait_ready(1)


def test_port_forward_to_a_pod(k8s_node, k8s_namespace):
    from kubernetes.stream import portforward
    core = k8s_node.control_plane.core()
    server = ["python3", "-c",
              "import socket\n"
              "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('127.0.0.1', 8765)); s.listen()\n"
              "while True:\n"
              "    c, _ = s.accept(); data = c.recv(100); c.sendall(b'pong:' + data); c.close()\n"]
    core.create_namespaced_pod(k8s_namespace, _pod("pf", server, ports=[8765]))
    try:
        _wait_running(core, "pf", k8s_namespace)
        deadline = time.time() + 20
        while True:
            pf = portforward(core.connect_get_namespaced_pod_portforward, "pf", k8s_namespace, ports="8765")
            sock = pf.socket(8765)
            sock.settimeout(10)
            sock.sendall(b"ping")
            reply = b""
            try:
                while not reply.endswith(b"ping"):
                    chunk = sock.recv(100)
                    if not chunk:
                        break
                    reply += chunk
            except OSError:
                pass
            sock.close()
            err = pf.error(8765)
            pf.close()
            if reply == b"pong:ping":
                break
            if time.time() > deadline:  # the server may not be listening yet on the first try
                raise AssertionError(f"port-forward reply {reply!r}, error {err!r}")
            time.sleep(0.5)
    finally:
        core.delete_namespaced_pod("pf", k8s_namespace, grace_period_seconds=0)


def test_host_network_pod_reaches_the_hosts_loopback(k8s_node, k8s_namespace):
    """What a warm-pool test needs: worker Pods (hostNetwork) connecting to a broker on 127.0.0.1."""
    core = k8s_node.control_plane.core()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(60)
    port = srv.getsockname()[1]
    got = {}

    def accept():
        try:
            c, _ = srv.accept()
            c.settimeout(10)
            got["data"] = c.recv(100)
            c.close()
        except OSError as e:
            got["error"] = e

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    cmd = ["python3", "-c", f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
                            "s.sendall(b'hello from a pod'); s.close()"]
    core.create_namespaced_pod(k8s_namespace, _pod("hostnet", cmd, host_network=True))
    try:
        t.join(60)
        assert got.get("data") == b"hello from a pod", (got, _pod_logs(core, "hostnet", k8s_namespace))
    finally:
        srv.close()
        core.delete_namespaced_pod("hostnet", k8s_namespace, grace_period_seconds=0)


def test_pod_network_stays_on_this_machine(k8s_node, k8s_namespace):
    core = k8s_node.control_plane.core()
    probe = ["python3", "-c",
             "print(open('/etc/resolv.conf').read()); print(open('/proc/net/route').read())"]
    core.create_namespaced_pod(k8s_namespace, _pod("netcheck", probe))
    try:
        deadline = time.time() + 60
        while core.read_namespaced_pod("netcheck", k8s_namespace).status.phase != "Succeeded":
            assert time.time() < deadline, core.read_namespaced_pod("netcheck", k8s_namespace).status
            time.sleep(0.3)
        out = core.read_namespaced_pod_log("netcheck", k8s_namespace)
        nameservers = [line.split()[1] for line in out.splitlines() if line.startswith("nameserver")]
        assert nameservers and all(ns.startswith("127.") for ns in nameservers), out
        routes = [line.split() for line in out.splitlines()[1:] if line.startswith("eth0")]
        assert routes, out
        assert all(r[1] != "00000000" for r in routes), f"pod has a default route:\n{out}"
    finally:
        core.delete_namespaced_pod("netcheck", k8s_namespace, grace_period_seconds=0)


def test_missing_image_fails_fast_without_network(k8s_node, k8s_namespace):
    """Images are never pulled: a Pod naming an image the node lacks gets ErrImagePull /
    ImagePullBackOff within seconds (containerd's proxy is a dead 127.0.0.1 port), which is what
    issue 4's PodFailed relies on."""
    core = k8s_node.control_plane.core()
    pod = _pod("nopull", ["true"], image="runnable-k8s-does-not-exist:0.0")
    pod.spec.containers[0].image_pull_policy = "IfNotPresent"
    core.create_namespaced_pod(k8s_namespace, pod)
    try:
        deadline = time.time() + 30
        reason = None
        while time.time() < deadline and reason not in ("ErrImagePull", "ImagePullBackOff"):
            st = core.read_namespaced_pod("nopull", k8s_namespace).status
            for cs in st.container_statuses or []:
                if cs.state and cs.state.waiting:
                    reason = cs.state.waiting.reason
            time.sleep(0.3)
        assert reason in ("ErrImagePull", "ImagePullBackOff"), st
    finally:
        core.delete_namespaced_pod("nopull", k8s_namespace, grace_period_seconds=0)


def test_cluster_processes_listen_on_loopback_only(k8s_node):
    """Every TCP/UDP socket the cluster's processes listen on is bound to 127.0.0.1."""
    from . import cluster
    pids = {str(info["pid"]) for info in cluster.load_state().get("pids", {}).values()}
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]
    assert ours, out  # etcd, kube-apiserver, kubelet and containerd's streaming server listen
    for line in ours:
        local = line.split()[4]
        assert local.rsplit(":", 1)[0] == "127.0.0.1", line
