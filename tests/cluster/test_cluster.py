"""The test cluster itself, checked through the same fixtures the ephemeral-mode and
warm-worker tests use.

Control-plane tier: Pods without a node (create / watch / delete), the Deployment scale
subresource, RBAC refusals, helm install.  Node tier: a real Pod of the worker image attached
through the API, a Deployment of it scaled 1 -> 3 -> 1, port-forward, a hostNetwork Pod
reaching a server on the host's 127.0.0.1, the Pod network's isolation, and Services: a Pod
reaches one by ClusterIP and by DNS name (kube-proxy + CoreDNS), a hostNetwork Pod resolves
Service names, and nothing a Pod sends or asks for leaves this machine.
"""
from __future__ import annotations

import errno
import json
import os
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
         node_selector=None, labels=None, ports=None, dns_policy=None):
    client = _k8s()
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {"app": name}),
        spec=client.V1PodSpec(
            restart_policy="Never", host_network=host_network, node_selector=node_selector, dns_policy=dns_policy,
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
    got: dict[str, object] = {}

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


def _hex_ip(field: str) -> str:
    """An address of /proc/net/route (little-endian hex) as dotted quad."""
    return socket.inet_ntoa(bytes.fromhex(field)[::-1])


def test_pod_network_stays_on_this_machine(k8s_node, k8s_namespace):
    """A Pod's routes: its own link (the pod range) and the Service range via the bridge's host
    address, no default route; its DNS server is CoreDNS on that address (dnsPolicy ClusterFirst),
    while dnsPolicy Default gets the node's resolv.conf, where nothing answers."""
    from . import cluster
    core = k8s_node.control_plane.core()
    probe = ["python", "-c",
             "print(open('/etc/resolv.conf').read()); print(open('/proc/net/route').read())"]
    default_dns = _pod("netcheck-default", ["python", "-c", "print(open('/etc/resolv.conf').read())"],
                       dns_policy="Default")
    core.create_namespaced_pod(k8s_namespace, _pod("netcheck", probe))
    core.create_namespaced_pod(k8s_namespace, default_dns)
    try:
        for name in ("netcheck", "netcheck-default"):
            deadline = time.time() + 60
            while core.read_namespaced_pod(name, k8s_namespace).status.phase != "Succeeded":
                assert time.time() < deadline, core.read_namespaced_pod(name, k8s_namespace).status
                time.sleep(0.3)
        out = core.read_namespaced_pod_log("netcheck", k8s_namespace)
        nameservers = [line.split()[1] for line in out.splitlines() if line.startswith("nameserver")]
        assert nameservers == [cluster.CLUSTER_DNS], out
        assert f"search {k8s_namespace}.svc.cluster.local svc.cluster.local cluster.local" in out, out
        routes = {(_hex_ip(r[1]), _hex_ip(r[7]), _hex_ip(r[2]))  # destination, mask, gateway
                  for r in (line.split() for line in out.splitlines()) if r and r[0] == "eth0"}
        assert routes == {("10.234.0.0", "255.255.255.0", "0.0.0.0"),
                          ("10.235.0.0", "255.255.255.0", cluster.POD_GATEWAY)}, f"unexpected routes:\n{out}"
        out = core.read_namespaced_pod_log("netcheck-default", k8s_namespace)
        nameservers = [line.split()[1] for line in out.splitlines() if line.startswith("nameserver")]
        assert nameservers and all(ns.startswith("127.") for ns in nameservers), out
    finally:
        for name in ("netcheck", "netcheck-default"):
            core.delete_namespaced_pod(name, k8s_namespace, grace_period_seconds=0)


def test_missing_image_fails_fast_without_network(k8s_node, k8s_namespace):
    """Images are never pulled: a Pod naming an image the node lacks gets ErrImagePull /
    ImagePullBackOff within seconds (containerd's proxy is a dead 127.0.0.1 port), which is what
    ephemeral mode's PodFailed relies on."""
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
    """Every TCP/UDP socket the cluster's processes listen on is bound to 127.0.0.1, except
    CoreDNS's port 53 on the pod bridge's address (which exists only on this machine)."""
    from . import cluster
    pids = {name: str(info["pid"]) for name, info in cluster.load_state().get("pids", {}).items()}
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    ours = {line: name for line in out.splitlines() for name, p in pids.items() if f"pid={p}," in line}
    assert ours, out  # etcd, kube-apiserver, kubelet, kube-proxy, CoreDNS and containerd's streaming server
    assert {"kube-proxy", "coredns"} <= set(ours.values()), out  # kube-proxy: healthz + metrics; CoreDNS: ready
    for line, name in ours.items():
        local = line.split()[4]
        if name == "coredns" and local == f"{cluster.CLUSTER_DNS}:53":
            continue
        assert local.rsplit(":", 1)[0] == "127.0.0.1", (name, line)
    dns = {line.split()[0] for line, name in ours.items() if line.split()[4] == f"{cluster.CLUSTER_DNS}:53"}
    assert dns == {"udp", "tcp"}, out


# ------------------------------------------------------------------ Services and DNS
ECHO_SERVER = ("import socket\n"
               "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
               "s.bind(('0.0.0.0', 8080)); s.listen()\n"
               "while True:\n"
               "    c, peer = s.accept(); data = c.recv(100)\n"
               "    c.sendall(b'pong:' + data + b' from:' + peer[0].encode()); c.close()\n")


def _echo_service(core, ns: str, name: str = "echo", service_type: str = "ClusterIP"):
    """A Pod of the worker image answering on 8080 behind a Service on port 80; returns the
    Service once the Pod is Ready (so the Service has an endpoint)."""
    client = _k8s()
    pod = _pod(name, ["python", "-c", ECHO_SERVER], ports=[8080])
    pod.spec.containers[0].readiness_probe = client.V1Probe(
        tcp_socket=client.V1TCPSocketAction(port=8080), period_seconds=1)
    core.create_namespaced_pod(ns, pod)
    svc = core.create_namespaced_service(ns, client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(selector={"app": name}, type=service_type,
                                  ports=[client.V1ServicePort(name="echo", port=80, target_port=8080)])))
    deadline = time.time() + 60
    while not any(c.type == "Ready" and c.status == "True"
                  for c in core.read_namespaced_pod(name, ns).status.conditions or []):
        assert time.time() < deadline, core.read_namespaced_pod(name, ns).status
        time.sleep(0.3)
    return svc


def _run_probe(core, ns: str, name: str, code: str, *, host_network=False, dns_policy=None,
               timeout: float = 90) -> dict:
    """Run ``code`` (Python printing one JSON line last) in a Pod of the worker image; its result."""
    core.create_namespaced_pod(ns, _pod(name, ["python", "-c", code], host_network=host_network,
                                        dns_policy=dns_policy))
    try:
        deadline = time.time() + timeout
        while (phase := core.read_namespaced_pod(name, ns).status.phase) not in ("Succeeded", "Failed"):
            assert time.time() < deadline, core.read_namespaced_pod(name, ns).status
            time.sleep(0.3)
        out = core.read_namespaced_pod_log(name, ns)
        assert phase == "Succeeded", out
        return json.loads(out.strip().splitlines()[-1])
    finally:
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)


CONNECT_PROBE = """\
import json, socket, time
out = {"resolv.conf": open("/etc/resolv.conf").read()}
for host in %r:
    deadline = time.time() + 30  # kube-proxy writes a new Service's rules within about a second
    while True:
        try:
            addr = socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            with socket.create_connection((host, 80), timeout=5) as s:
                s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
                out[host] = {"addr": addr, "reply": s.recv(200).decode()}
            break
        except OSError as e:
            if time.time() > deadline:
                out[host] = {"error": repr(e)}
                break
            time.sleep(0.3)
print(json.dumps(out))
"""


def test_a_pod_reaches_a_service_by_cluster_ip_and_dns_name(k8s_node, k8s_namespace):
    """kube-proxy DNATs the ClusterIP to the Pod; CoreDNS answers the full name and, through the
    Pod's search path, the short name; the server sees the client Pod's own address (no SNAT)."""
    core, ns = k8s_node.control_plane.core(), k8s_namespace
    cluster_ip = _echo_service(core, ns).spec.cluster_ip
    assert cluster_ip.startswith("10.235.0."), cluster_ip
    names = [cluster_ip, f"echo.{ns}.svc.cluster.local", "echo", f"echo.{ns}"]
    t0 = time.monotonic()
    out = _run_probe(core, ns, "client", CONNECT_PROBE % (names,))
    client_ip = None
    print(f"probe Pod ran in {time.monotonic() - t0:.1f}s")
    for name in names:
        assert "error" not in out[name], out
        assert out[name]["addr"] == cluster_ip, (name, out)
        reply, _, seen_from = out[name]["reply"].partition(" from:")
        assert reply == "pong:ping", out
        assert seen_from.startswith("10.234.0.") and seen_from != k8s_node.host_ip, out  # the Pod itself
        client_ip = client_ip or seen_from
        assert seen_from == client_ip, out


def test_a_host_network_pod_resolves_service_names(k8s_node, k8s_namespace):
    """dnsPolicy ClusterFirstWithHostNet: a hostNetwork Pod asks CoreDNS too (the bridge address
    is local to the host namespace), so chart Pods on the host network can find Services by name."""
    from . import cluster
    client = _k8s()
    core, ns = k8s_node.control_plane.core(), k8s_namespace
    svc = core.create_namespaced_service(ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="named"),
        spec=client.V1ServiceSpec(selector={"app": "nothing"}, ports=[client.V1ServicePort(port=80)])))
    names = [f"named.{ns}.svc.cluster.local", "named", "kubernetes.default"]
    code = ("import json, socket\n"
            "out = {'resolv.conf': open('/etc/resolv.conf').read()}\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        out[name] = socket.gethostbyname(name)\n"
            "    except OSError as e:\n"
            "        out[name] = repr(e)\n"
            "print(json.dumps(out))\n")
    out = _run_probe(core, ns, "hostdns", code, host_network=True, dns_policy="ClusterFirstWithHostNet")
    assert f"nameserver {cluster.CLUSTER_DNS}" in out["resolv.conf"], out
    assert out[names[0]] == out["named"] == svc.spec.cluster_ip, out
    assert out["kubernetes.default"] == "10.235.0.1", out


NOTHING_LEAVES_PROBE = """\
import json, socket, time
out = {}
for name in ("example.com", "example.com.", "pypi.org"):
    t0 = time.monotonic()
    try:
        out[name] = {"resolved": socket.getaddrinfo(name, 443)[0][4][0]}
    except socket.gaierror as e:
        out[name] = {"gaierror": e.errno, "message": str(e)}
    out[name]["seconds"] = round(time.monotonic() - t0, 3)
t0 = time.monotonic()
try:
    socket.create_connection(("1.1.1.1", 443), timeout=20).close()
    out["1.1.1.1"] = {"connected": True}
except OSError as e:
    out["1.1.1.1"] = {"errno": e.errno, "message": repr(e)}
out["1.1.1.1"]["seconds"] = round(time.monotonic() - t0, 3)
t0 = time.monotonic()
try:  # a ClusterIP no Service holds: kube-proxy has nothing to DNAT it to
    socket.create_connection(("10.235.0.254", 80), timeout=20).close()
    out["unused ClusterIP"] = {"connected": True}
except OSError as e:
    out["unused ClusterIP"] = {"errno": e.errno, "message": repr(e)}
out["unused ClusterIP"]["seconds"] = round(time.monotonic() - t0, 3)
print(json.dumps(out))
"""


def test_nothing_a_pod_asks_for_leaves_the_machine(k8s_node, k8s_namespace):
    """Any name outside cluster.local gets NXDOMAIN from CoreDNS at once (EAI_NONAME, not the
    EAI_AGAIN of a timeout: nothing was forwarded), and a public address has no route at all
    (ENETUNREACH, not a connect timeout: no packet left the Pod); a ClusterIP kube-proxy has nothing
    to DNAT to is refused by the host's unreachable route (EHOSTUNREACH, not a timeout: a client
    retrying a Service whose Pod is being replaced tries again at once)."""
    core = k8s_node.control_plane.core()
    out = _run_probe(core, k8s_namespace, "offline", NOTHING_LEAVES_PROBE)
    print({k: v["seconds"] for k, v in out.items()})
    for name in ("example.com", "example.com.", "pypi.org"):
        assert out[name].get("gaierror") == socket.EAI_NONAME, out
    assert out["1.1.1.1"].get("errno") == errno.ENETUNREACH, out
    assert out["unused ClusterIP"].get("errno") == errno.EHOSTUNREACH, out


def _dns_query(server: str, name: str, qtype: int = 1, timeout: float = 5) -> tuple[int, list[str]]:
    """One DNS question over UDP: (rcode, the A records of the answer)."""
    import struct
    qid = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        reply = s.recv(4096)
    rid, flags, _, ancount, _, _ = struct.unpack(">HHHHHH", reply[:12])
    assert rid == qid
    pos = 12 + len(question) + 4
    addrs = []
    for _ in range(ancount):
        while reply[pos] != 0 and reply[pos] < 0xC0:  # the owner name (labels or a pointer)
            pos += reply[pos] + 1
        pos += 2 if reply[pos] >= 0xC0 else 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", reply[pos:pos + 10])
        if rtype == 1:
            addrs.append(socket.inet_ntoa(reply[pos + 10:pos + 10 + rdlen]))
        pos += 10 + rdlen
    return flags & 0xF, addrs


def test_service_wiring_on_the_host_keeps_everything_local(k8s_node, k8s_namespace):
    """What kube-proxy and CoreDNS do to the host, read back from it: DNAT only into the pod range,
    masquerading only of Service traffic on its way to a Pod (out of the bridge), our DROP rules
    ahead of kube-proxy's, the Service range still unreachable, a Corefile with no forwarding, and
    none of the sysctls kube-proxy could touch changed. The host reaches a NodePort on the bridge
    address (its way into a Service: ClusterIPs are unreachable for it)."""
    from . import cluster
    core = k8s_node.control_plane.core()
    svc = _echo_service(core, k8s_namespace, service_type="NodePort")
    cluster_ip, node_port = svc.spec.cluster_ip, svc.spec.ports[0].node_port
    state = cluster.load_state()

    # From the host: the NodePort on 10.234.0.1 answers (masqueraded to the bridge address on its
    # way to the Pod); the ClusterIP does not route at all.
    deadline = time.time() + 10
    while True:
        try:
            with socket.create_connection((cluster.POD_GATEWAY, node_port), timeout=5) as conn:
                conn.sendall(b"host")
                conn.shutdown(socket.SHUT_WR)
                assert conn.recv(200) == f"pong:host from:{cluster.POD_GATEWAY}".encode()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    with pytest.raises(OSError) as refused:
        socket.create_connection((cluster_ip, 80), timeout=5)
    assert refused.value.errno == errno.EHOSTUNREACH, refused.value  # the unreachable route, at once

    # CoreDNS: cluster names from the API; any other name NXDOMAIN from CoreDNS itself.
    fqdn = f"echo.{k8s_namespace}.svc.cluster.local"
    deadline = time.time() + 10
    while _dns_query(cluster.CLUSTER_DNS, fqdn) != (0, [cluster_ip]):
        assert time.time() < deadline, _dns_query(cluster.CLUSTER_DNS, fqdn)
        time.sleep(0.2)
    assert _dns_query(cluster.CLUSTER_DNS, "example.com") == (3, [])
    assert _dns_query(cluster.CLUSTER_DNS, "no-such-service.default.svc.cluster.local") == (3, [])
    corefile = Path(state["corefile"]).read_text()
    plugins = {line.split()[0] for line in corefile.splitlines() if line.strip() and not line.strip().startswith("#")}
    assert not plugins & {"forward", "proxy", "grpc", "etcd", "file", "auto", "secondary"}, corefile
    servers = [line for line in corefile.splitlines() if line.endswith("{") and not line.startswith((" ", "#"))]
    assert len(servers) == corefile.count(f"    bind {cluster.CLUSTER_DNS}\n") == 2, corefile  # no :53 elsewhere

    # kube-proxy's nat rules: every DNAT goes into the pod range (Services have only Pod endpoints
    # here), and every address in it is on the bridge.
    nat = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    dnat = [line.split("--to-destination ")[1].split()[0].rsplit(":", 1)[0]
            for line in nat.splitlines() if "-j DNAT" in line]
    assert dnat, nat  # at least the echo Service's endpoint
    import ipaddress
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network(cluster.POD_CIDR) for a in dnat), dnat
    route = subprocess.run(["ip", "route", "get", dnat[0]], capture_output=True, text=True, check=True).stdout
    assert f"dev {cluster.BRIDGE}" in route, route
    # Masquerading: only kube-proxy's, gated on the mark that only its Service chains set (and
    # those DNAT into the pod range, out of the bridge): nothing leaves through another interface.
    masq = [line for line in nat.splitlines() if "-j MASQUERADE" in line or "-j SNAT" in line]
    ours = [line for line in masq if "KUBE-" in line or "CNI-" in line or cluster.POD_CIDR in line]
    assert ours and all(line.startswith("-A KUBE-POSTROUTING ") for line in ours), masq
    post = [line for line in nat.splitlines() if line.startswith("-A KUBE-POSTROUTING ")]
    assert "! --mark 0x4000/0x4000 -j RETURN" in post[0], post
    marks = [line.split()[1] for line in nat.splitlines() if "-j KUBE-MARK-MASQ" in line]
    assert all(c.startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SERVICES", "KUBE-NODEPORTS"))
               for c in marks), marks
    # Our DROP rules come first, ahead of kube-proxy's KUBE-FORWARD (which accepts marked packets).
    fwd = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True, check=True).stdout
    first = fwd.splitlines()[1:3]
    assert all(cluster.POD_CIDR in line and line.endswith("-j DROP") for line in first), fwd
    assert "-j KUBE-FORWARD" in fwd, fwd
    # The Service range stays unreachable: what kube-proxy did not DNAT is refused here, never routed on.
    unreachable = subprocess.run(["ip", "route", "show", "type", "unreachable"], capture_output=True,
                                 text=True).stdout
    assert cluster.SERVICE_CIDR in unreachable, unreachable
    # kube-proxy left the conntrack limits and timeouts (and route_localnet) as they were.
    for key, before in state["host"]["sysctls"].items():
        if key.startswith(("net.netfilter.", "net.ipv4.conf.all.route_localnet")):
            now = Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
            assert now == before, (key, before, now)

