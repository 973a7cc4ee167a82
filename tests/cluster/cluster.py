"""Bring the single-node test cluster up and down (see README.md in this folder).

Everything runs as local processes of this machine, bound to 127.0.0.1:

  control-plane tier: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
  node tier:          + containerd (private config/root/state/socket) + kubelet (one node)
                      + kube-proxy (iptables mode: Service ClusterIPs -> Pod IPs)
                      + CoreDNS on the pod bridge's address (cluster.local only, no forwarding)

All state lives under one folder (STATE_DIR, default /tmp/rk8s-cluster); `state.json` there
records every PID this module started and every host change it made (bridge, route,
iptables rules, sysctls), so `down` undoes exactly those and nothing else.

Stdlib only (the kubernetes client is not needed here): certificates come from `openssl`.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.ports import free_port

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent


def _versions() -> dict[str, str]:
    out = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


VERSIONS = _versions()
CACHE = Path(os.environ.get("RUNNABLE_K8S_CLUSTER_CACHE") or Path.home() / ".cache" / "runnable-k8s-cluster")
BIN = CACHE / "bin"
IMAGES = CACHE / "images"
STATE_DIR = Path(os.environ.get("RUNNABLE_K8S_CLUSTER_STATE") or "/tmp/rk8s-cluster")
STATE_FILE = STATE_DIR / "state.json"
# One cluster per machine (fixed bridge name, pod range, /kubepods cgroups, the kubelet's fixed
# device-plugin socket): every user of it (ci.sh, a pytest session that starts it, `up`/`down`
# by hand) holds this lock meanwhile.  RUNNABLE_K8S_CLUSTER_LOCK_HELD=1 says a parent holds it.
# Size limit of the tmpfs holding the cluster's state ("0": plain folder on disk).
STATE_TMPFS_SIZE = os.environ.get("RUNNABLE_K8S_CLUSTER_TMPFS_SIZE", "8g")
LOCK_FILE = Path(os.environ.get("RUNNABLE_K8S_CLUSTER_LOCK") or f"{STATE_DIR}.lock")

# The kubelet refuses a loopback node IP, so the node's InternalIP is the pod bridge's own
# address (exists only on this machine), while the API server reaches the kubelet by the node's
# Hostname address, "localhost" (-> 127.0.0.1, where the kubelet listens).
NODE_NAME = "localhost"
POD_CIDR = "10.234.0.0/24"      # pods' own addresses: exist only on the bridge below
POD_GATEWAY = "10.234.0.1"      # the bridge's address in the host namespace
SERVICE_CIDR = "10.235.0.0/24"  # Service ClusterIPs: kube-proxy DNATs them; the rest is unreachable
# CoreDNS listens on the bridge's host address: Pods reach it on their own link, hostNetwork Pods
# as a local address (a ClusterIP would not do for them: the Service range is unreachable on the host).
CLUSTER_DNS = POD_GATEWAY
CLUSTER_DOMAIN = "cluster.local"
BRIDGE = "rk8s0"
CNI_NETWORK = "rk8s-test"
# Host firewall rules `up` adds (and `down` removes), each inserted at the top of its chain.
HOST_RULES = [
    # Pod addresses talk to Pods and to this host, nothing is forwarded anywhere else
    ["FORWARD", "-s", POD_CIDR, "!", "-d", POD_CIDR, "-j", "DROP"],
    ["FORWARD", "-d", POD_CIDR, "!", "-s", POD_CIDR, "-j", "DROP"],
    # the bridge address (CoreDNS, NodePorts) answers Pods (via the bridge) and this host only
    ["INPUT", "-d", f"{POD_GATEWAY}/32", "!", "-i", BRIDGE, "-m", "addrtype", "!", "--src-type", "LOCAL",
     "-j", "DROP"],
]
# The name in the front proxy's client certificate (the aggregation layer; see make_pki).
FRONT_PROXY_CLIENT = "front-proxy-client"
# The HPA controller's sync period (kube-controller-manager's default is 15 s).
HPA_SYNC_SECONDS = 5
WORKER_IMAGE = "docker.io/library/runnable-k8s-worker:latest"
# The project's Dockerfile built with buildah (tests/cluster/worker-image.sh).
WORKER_LAYOUT = IMAGES / "worker-dockerfile.oci"
PAUSE_IMAGE = "docker.io/library/runnable-k8s-pause:test"
# Any image pull is sent to a dead local proxy, so nothing is ever fetched from the network; only
# this machine's own addresses go direct (the pod range: the API server reaches an extension API
# server, such as the external metrics adapter, at its endpoint there).
_DIRECT = f"127.0.0.1,localhost,{POD_CIDR}"
NO_NETWORK_ENV = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                  "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                  "NO_PROXY": _DIRECT, "no_proxy": _DIRECT}
SYSCTLS = ["net.ipv4.ip_forward", "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic",
           "kernel.panic_on_oops", "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
           # set by up (bridged Service replies must pass conntrack to be un-DNATed)
           "net.bridge.bridge-nf-call-iptables",
           # what kube-proxy could touch; its configuration tells it to leave them alone
           "net.ipv4.conf.all.route_localnet", "net.netfilter.nf_conntrack_max",
           "net.netfilter.nf_conntrack_tcp_timeout_established",
           "net.netfilter.nf_conntrack_tcp_timeout_close_wait", "net.netfilter.nf_conntrack_tcp_be_liberal",
           "net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream"]
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ClusterError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S", time.gmtime()) + " [cluster] " + msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- lock
class ClusterLock:
    """An exclusive flock on LOCK_FILE; a no-op when RUNNABLE_K8S_CLUSTER_LOCK_HELD=1."""

    def __init__(self, purpose: str):
        self.purpose = purpose
        self.fd: int | None = None
        self.inherited = os.environ.get("RUNNABLE_K8S_CLUSTER_LOCK_HELD") == "1"

    def holder(self) -> str:
        try:
            return LOCK_FILE.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, timeout: float) -> bool:
        if self.inherited or self.fd is not None:
            return True
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.time() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    os.close(fd)
                    return False
                if not announced:
                    log(f"waiting for the test cluster lock (held by: {self.holder()})")
                    announced = True
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.purpose}\n".encode(), 0)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------- state
def load_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def save_state(state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(STATE_FILE)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    p = subprocess.run(cmd, **kw)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stderr or '').strip()[-2000:]}")
    return p


def pid_alive(pid: int, exe_hint: str | None = None) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return exe_hint is None or any(exe_hint.encode() in part for part in cmdline[:1] + cmdline[1:2])


def spawn(state: dict, name: str, cmd: list[str], env: dict | None = None) -> int:
    logdir = STATE_DIR / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / f"{name}.log", "ab") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, **NO_NETWORK_ENV, **(env or {})})
    state.setdefault("pids", {})[name] = {"pid": p.pid, "exe": cmd[0]}
    save_state(state)
    return p.pid


def stop_pid(name: str, info: dict, timeout: float = 15) -> None:
    pid, exe = info["pid"], info["exe"]
    if not pid_alive(pid, os.path.basename(exe)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and pid_alive(pid, os.path.basename(exe)):
        time.sleep(0.1)
    if pid_alive(pid, os.path.basename(exe)):
        log(f"{name} (pid {pid}) still running {timeout:.0f}s after SIGTERM; killing")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    took = time.time() - (deadline - timeout)
    if took > 2:
        log(f"{name} took {took:.1f}s to stop")


@contextlib.contextmanager
def phase(name: str, slow: float = 1.0):
    t0 = time.time()
    yield
    if time.time() - t0 > slow:
        log(f"{name} took {time.time() - t0:.1f}s")


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_for(what: str, check, timeout: float, state: dict | None = None, proc: str | None = None,
             interval: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last = e
        if state and proc:
            info = state["pids"].get(proc)
            # No executable check here: right after the spawn /proc/PID/cmdline can still be
            # empty, and our own unreaped child's PID cannot be reused meanwhile.
            if info and not pid_alive(info["pid"]):
                raise ClusterError(f"{proc} exited while waiting for {what}:\n"
                                   + tail(STATE_DIR / "logs" / f"{proc}.log"))
        time.sleep(interval)
    msg = f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else "")
    if proc:
        msg += "\n" + tail(STATE_DIR / "logs" / f"{proc}.log")
    raise ClusterError(msg)


# ----------------------------------------------------------------------------------- PKI
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_pki(pki: Path) -> None:
    """A throw-away CA plus one certificate per identity (ECDSA P-256, valid 30 days)."""
    pki.mkdir(parents=True, exist_ok=True)
    cnf = pki / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *newkey, "-config", str(cnf), "-extensions", "ca",
         "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"), "-days", "30",
         "-subj", "/CN=runnable-k8s-test-ca"])
    apiserver_sans = ["IP:127.0.0.1", "DNS:localhost", "IP:10.235.0.1", "DNS:kubernetes",
                      "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                      "DNS:kubernetes.default.svc.cluster.local"]
    leaves = {
        "apiserver": ("/CN=kube-apiserver", apiserver_sans),
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", []),
        "admin": ("/O=system:masters/CN=runnable-k8s-test-admin", []),
        "controller-manager": ("/CN=system:kube-controller-manager", []),
        "scheduler": ("/CN=system:kube-scheduler", []),
        "kubelet": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", ["IP:127.0.0.1", "DNS:localhost",
                                                                   f"DNS:{NODE_NAME}"]),
        # bound to the built-in ClusterRole system:node-proxier
        "kube-proxy": ("/CN=system:kube-proxy", []),
        # bound at `up` to a ClusterRole that reads Services, EndpointSlices, namespaces (COREDNS_RBAC)
        "coredns": ("/CN=system:coredns", []),
    }
    for name, (subj, sans) in leaves.items():
        ext = pki / f"{name}.ext"
        ext.write_text(OPENSSL_CNF + (f"subjectAltName = {','.join(sans)}\n" if sans else ""))
        run(["openssl", "req", "-new", *newkey, "-config", str(cnf), "-keyout", str(pki / f"{name}.key"),
             "-out", str(pki / f"{name}.csr"), "-subj", subj])
        run(["openssl", "x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
             "-CAkey", str(pki / "ca.key"), "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
             "-days", "30", "-extfile", str(ext), "-extensions", "leaf",
             "-out", str(pki / f"{name}.crt")])
    # The aggregation layer's front proxy (kubeadm's layout): a CA of its own, and the client
    # certificate kube-apiserver presents to extension API servers (e.g. the external metrics
    # adapter an HPA reads), which trust only that CA and that name for the user it forwards.
    run(["openssl", "req", "-x509", *newkey, "-config", str(cnf), "-extensions", "ca",
         "-keyout", str(pki / "front-proxy-ca.key"), "-out", str(pki / "front-proxy-ca.crt"), "-days", "30",
         "-subj", "/CN=runnable-k8s-test-front-proxy-ca"])
    run(["openssl", "req", "-new", *newkey, "-config", str(cnf), "-keyout", str(pki / "front-proxy-client.key"),
         "-out", str(pki / "front-proxy-client.csr"), "-subj", f"/CN={FRONT_PROXY_CLIENT}"])
    run(["openssl", "x509", "-req", "-in", str(pki / "front-proxy-client.csr"), "-CA", str(pki / "front-proxy-ca.crt"),
         "-CAkey", str(pki / "front-proxy-ca.key"), "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
         "-days", "30", "-extfile", str(cnf), "-extensions", "leaf", "-out", str(pki / "front-proxy-client.crt")])
    # Service-account token signing key.
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki / "sa.key")])
    run(["openssl", "ec", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")])
    for p in pki.iterdir():
        if p.suffix == ".key":
            p.chmod(0o600)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "rk8s",
        "clusters": [{"name": "rk8s", "cluster": {"server": server,
                                                  "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                          "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "rk8s", "context": {"cluster": "rk8s", "user": user,
                                                  "namespace": "default"}}],
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML; every kubeconfig reader accepts it


def api_get(state: dict, path: str, timeout: float = 5, method: str = "GET",
            body: dict | None = None) -> tuple[int, bytes]:
    pki = Path(state["pki"])
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    req = urllib.request.Request(state["server"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------- binaries
def require_bins(names: list[str]) -> None:
    missing = [n for n in names if not os.access(BIN / n, os.X_OK)]
    if missing:
        raise ClusterError(f"not built: {', '.join(missing)} (run: bash tests/cluster/build.sh)")


def require_host_tools(names: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    missing: list[str] = []
    for n in names:
        p = shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")
        (found.__setitem__(n, p) if p else missing.append(n))
    if missing:
        raise ClusterError(f"missing host tools: {', '.join(missing)} (run: bash tests/cluster/build.sh deps)")
    return found


# ------------------------------------------------------------------------ control plane
def up_control_plane(state: dict) -> None:
    tools = require_host_tools(["etcd", "openssl"])
    require_bins(["kube-apiserver", "kube-controller-manager", "kube-scheduler"])
    pki = STATE_DIR / "pki"
    t0 = time.time()
    make_pki(pki)
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    state.update(pki=str(pki), server=server, api_port=api_port, etcd_port=etcd_port)
    for user in ("admin", "controller-manager", "scheduler", "kubelet", "kube-proxy", "coredns"):
        write_kubeconfig(STATE_DIR / f"{user}.kubeconfig", server, pki, user)
    state["kubeconfig"] = str(STATE_DIR / "admin.kubeconfig")
    save_state(state)
    log(f"pki + kubeconfigs made in {time.time() - t0:.1f}s")

    spawn(state, "etcd", [tools["etcd"], "--name", "rk8s", "--data-dir", str(STATE_DIR / "etcd"),
                          "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                          "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                          "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                          "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                          "--initial-cluster", f"rk8s=http://127.0.0.1:{peer_port}",
                          "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn"],
          env={"ETCD_UNSUPPORTED_ARCH": ""})

    def etcd_ok():
        with urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=2) as r:
            return b'"true"' in r.read()
    wait_for("etcd health", etcd_ok, 30, state, "etcd")
    log(f"etcd ready on 127.0.0.1:{etcd_port}")

    spawn(state, "kube-apiserver", [
        str(BIN / "kube-apiserver"),
        "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--advertise-address=127.0.0.1",
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        f"--cert-dir={STATE_DIR / 'apiserver-certs'}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC", "--allow-privileged=true",
        "--endpoint-reconciler-type=none",  # 127.0.0.1 is not a valid Endpoints address
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--kubelet-preferred-address-types=Hostname",
        # The aggregation layer, for extension API servers such as an external metrics adapter.
        # Routing to an APIService's endpoint address (not its ClusterIP) needs no kube-proxy.
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--enable-aggregator-routing=true",
        "--profiling=false", "--v=1",
    ])
    wait_for("kube-apiserver /readyz", lambda: api_get(state, "/readyz")[0] == 200, 90, state, "kube-apiserver")
    log(f"kube-apiserver ready at {server}")

    spawn(state, "kube-controller-manager", [
        str(BIN / "kube-controller-manager"),
        f"--kubeconfig={STATE_DIR / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
        # An HPA acts within seconds of its metric changing (15 s by default): tests wait less.
        f"--horizontal-pod-autoscaler-sync-period={HPA_SYNC_SECONDS}s",
        "--profiling=false", "--v=1",
    ])
    spawn(state, "kube-scheduler", [
        str(BIN / "kube-scheduler"), f"--kubeconfig={STATE_DIR / 'scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false", "--profiling=false", "--v=1",
    ])
    # Pods can only be created once the ServiceAccount controller made "default/default".
    wait_for("the default ServiceAccount (controller-manager running)",
             lambda: api_get(state, "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
             60, state, "kube-controller-manager")
    state["tiers"] = sorted(set(state.get("tiers", [])) | {"control-plane"})
    save_state(state)
    log("control plane ready")


# ---------------------------------------------------------------------------- host net
def _iptables_chains(cmd: str) -> dict[str, list[str]]:
    out = {}
    for table in ("filter", "nat", "mangle", "raw"):
        p = run([cmd, "-t", table, "-S"], check=False)
        out[table] = [line.split()[1] for line in p.stdout.splitlines() if line.startswith(("-N ", "-P "))]
    return out


def setup_host_network(state: dict) -> None:
    """Record what we change on the host, then isolate the pod range from the outside."""
    host = state.setdefault("host", {})
    host.setdefault("sysctls", {})
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            host["sysctls"][key] = Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
    host["iptables_chains"] = {c: _iptables_chains(c) for c in ("iptables", "ip6tables") if shutil.which(c)}
    host["cgroups_before"] = sorted(str(p) for p in CGROUP_ROOT.glob("*/kubepods"))
    host["var_lib_cni_existed"] = Path("/var/lib/cni").exists()
    # The kubelet's device-plugin socket path is fixed: /var/lib/kubelet/device-plugins/kubelet.sock
    host["var_lib_kubelet_existed"] = Path("/var/lib/kubelet").exists()
    host["var_log_containers_existed"] = Path("/var/log/containers").exists()
    host["var_log_pods_existed"] = Path("/var/log/pods").exists()
    host["run_containerd_existed"] = Path("/run/containerd").exists()
    save_state(state)
    # kube-proxy DNATs packets to a Service's ClusterIP in PREROUTING (Pods) and OUTPUT (host),
    # before routing; what it did not DNAT (no such Service or port) must not follow the host's
    # default route, so the whole range is routed "unreachable" while the cluster is up: the
    # kernel answers the sender at once (ICMP host unreachable to a Pod, EHOSTUNREACH to the host's
    # own connect(), which fails at the route lookup, before OUTPUT: see README), as kube-proxy's
    # REJECT does for a Service with no endpoints in a real cluster. A blackhole route dropped those
    # packets silently: a worker reconnecting to the broker's Service while the new broker Pod was
    # not Ready yet sat in SYN retransmits, and came back ~4 s after the broker did.
    if run(["ip", "route", "replace", "unreachable", SERVICE_CIDR], check=False).returncode == 0:
        host["service_route"] = SERVICE_CIDR
    # Pod addresses may talk to each other and to the bridge address on this host, never be
    # forwarded anywhere else (the bridge plugin turns on ip_forward for its gateway); after
    # kube-proxy's DNAT a Service's backend is a Pod, so the same two rules cover Service traffic.
    # The INPUT rule keeps what listens on the bridge address (CoreDNS) to the Pods and this host:
    # a neighbour routing 10.234.0.1 to this machine is dropped. pin_host_rules() puts them back
    # in front after kube-proxy prepended its own jumps.
    rules = HOST_RULES
    # The pod bridge is made here (not by the CNI plugin on the first Pod) because its address
    # is also the node's InternalIP, which must exist before the kubelet starts.
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        host["bridge"] = BRIDGE
        save_state(state)
    run(["ip", "addr", "replace", f"{POD_GATEWAY}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    host["iptables_rules"] = []
    for rule in rules:
        run(["iptables", "-w", "-I", *rule[:1], "1", *rule[1:]])
        host["iptables_rules"].append(rule)
        save_state(state)
    # Pod -> Service -> Pod: the request is routed through the host (DNAT), the reply is bridged
    # Pod to Pod; only with this does the reply pass conntrack and get its source un-DNATed.
    _set_sysctl("net.bridge.bridge-nf-call-iptables", "1")


def _set_sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys/" + key.replace(".", "/"))
    if not path.exists():
        raise ClusterError(f"sysctl {key} missing ({path}); for bridged Service replies load br_netfilter: "
                           "modprobe br_netfilter")
    if path.read_text().strip() != value:
        path.write_text(value)


def pin_host_rules(state: dict) -> None:
    """Move our DROP rules back to the top of their chains: kube-proxy prepends its jumps
    (KUBE-FORWARD accepts marked and established packets), and ours must be seen first."""
    for rule in state.get("host", {}).get("iptables_rules", []):
        while run(["iptables", "-w", "-C", *rule], check=False).returncode == 0:
            run(["iptables", "-w", "-D", *rule], check=False)
        run(["iptables", "-w", "-I", rule[0], "1", *rule[1:]])


def teardown_host_network(state: dict) -> list[str]:
    problems = []
    host = state.get("host", {})
    for rule in host.get("iptables_rules", []):
        while run(["iptables", "-w", "-C", *rule], check=False).returncode == 0:
            run(["iptables", "-w", "-D", *rule], check=False)
    # Chains that appeared while the cluster ran (kubelet's KUBE-* canaries, CNI-* chains).
    for cmd, before in host.get("iptables_chains", {}).items():
        now = _iptables_chains(cmd)
        for table, chains in now.items():
            new = [c for c in chains if c not in before.get(table, []) and c.startswith(("KUBE-", "CNI-"))]
            if not new:
                continue
            rules = run([cmd, "-t", table, "-S"], check=False).stdout.splitlines()
            for line in rules:
                # shlex: kube-proxy's rules carry quoted comments ("kubernetes service portals")
                parts = shlex.split(line)
                if parts[:1] == ["-A"] and parts[1] not in new and \
                        any(a in ("-j", "-g") and b in new for a, b in itertools.pairwise(parts)):
                    run([cmd, "-w", "-t", table, "-D", *parts[1:]], check=False)
            for c in new:
                run([cmd, "-w", "-t", table, "-F", c], check=False)
            for c in new:
                if run([cmd, "-w", "-t", table, "-X", c], check=False).returncode != 0:
                    problems.append(f"could not delete {cmd} {table} chain {c}")
    if host.get("service_route"):
        run(["ip", "route", "del", "unreachable", host["service_route"]], check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run(["ip", "link", "del", BRIDGE], check=False)
    for key, value in host.get("sysctls", {}).items():
        path = Path("/proc/sys/" + key.replace(".", "/"))
        with contextlib.suppress(OSError):
            if path.read_text().strip() != value:
                path.write_text(value)
    return problems


# -------------------------------------------------------------------------------- node
def containerd_config(d: Path) -> str:
    return f"""\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  disable_apparmor = true
  # This host withholds CAP_SYS_RESOURCE, so runc cannot lower oom_score_adj (the sandbox's
  # -998): "nsexec: failed to update /proc/self/oom_score_adj: Permission denied".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"""


def cni_config(d: Path) -> dict:
    return {
        "cniVersion": "0.4.0", "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": False,
            "ipMasq": False, "hairpinMode": True,
            # No default route: a Pod reaches the pod range on its link and the Service range
            # through the bridge's host address (where kube-proxy's DNAT applies), nothing else.
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                     "routes": [{"dst": SERVICE_CIDR, "gw": POD_GATEWAY}],
                     "dataDir": str(d / "cni" / "ipam")},
        }],
    }


def kubelet_config(state: dict, d: Path) -> dict:
    pki = Path(state["pki"])
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": "127.0.0.1", "port": state["kubelet_port"], "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": state["kubelet_healthz_port"],
        "tlsCertFile": str(pki / "kubelet.crt"), "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{d}/containerd/containerd.sock",
        "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
        # ClusterFirst Pods (and hostNetwork ones with ClusterFirstWithHostNet) ask CoreDNS;
        # dnsPolicy Default Pods get resolvConf (nameserver 127.0.0.1: nothing answers).
        "clusterDNS": [CLUSTER_DNS], "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(d / "resolv.conf"),
        "podLogsDir": str(d / "pod-logs"),
        "makeIPTablesUtilChains": False,
        "serializeImagePulls": False,
        "registerNode": True,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "maxPods": 50, "podPidsLimit": 4096,
        "nodeStatusReportFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s", "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(state: dict) -> dict:
    """iptables mode, everything it could change on the host beyond its own chains turned off."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(STATE_DIR / "kube-proxy.kubeconfig")},
        "hostnameOverride": NODE_NAME, "mode": "iptables",
        # Pods' own traffic to a Service keeps its source; only other sources (hairpin, the host)
        # are masqueraded, to the bridge address, on the way to a Pod.
        "clusterCIDR": POD_CIDR, "detectLocalMode": "ClusterCIDR",
        "healthzBindAddress": f"127.0.0.1:{state['kube_proxy_healthz_port']}",
        "metricsBindAddress": f"127.0.0.1:{state['kube_proxy_metrics_port']}",
        "enableProfiling": False,
        # NodePorts only on the bridge address (not on this machine's real interfaces), and not
        # on 127.0.0.1 (that would need net.ipv4.conf.all.route_localnet=1).
        "nodePortAddresses": [f"{POD_GATEWAY}/32"],
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "minSyncPeriod": "1s",
                     "syncPeriod": "30s"},
        # 0: leave nf_conntrack_max and the conntrack timeouts as they are (no sysctl written)
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


# Read access for CoreDNS's kubernetes plugin (what kubeadm grants system:coredns).
COREDNS_RBAC = [
    ("/apis/rbac.authorization.k8s.io/v1/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "system:coredns"},
        "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                   "verbs": ["list", "watch"]},
                  {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]}),
    ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "system:coredns"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}]}),
]


def _reverse_zone(cidr: str) -> str:
    """10.234.0.0/24 -> 0.234.10.in-addr.arpa (the /24s this cluster uses)."""
    net, bits = cidr.split("/")
    if bits != "24":
        raise ClusterError(f"reverse zone for {cidr}: only /24 ranges are supported")
    return ".".join(reversed(net.split(".")[:3])) + ".in-addr.arpa"


def corefile(state: dict) -> str:
    """cluster.local and the two ranges' reverse zones from the API, and an immediate NXDOMAIN
    for every other name: no forward plugin, so no query ever leaves this machine."""
    zones = " ".join([CLUSTER_DOMAIN, _reverse_zone(POD_CIDR), _reverse_zone(SERVICE_CIDR)])
    return f"""\
# runnable-k8s test cluster: cluster names only, nothing forwarded (see tests/cluster/README.md)
{zones} {{
    bind {CLUSTER_DNS}
    kubernetes {zones} {{
        kubeconfig {STATE_DIR / "coredns.kubeconfig"}
        pods disabled
        ttl 5
    }}
    ready 127.0.0.1:{state["coredns_ready_port"]}
    errors
    log
}}
. {{
    bind {CLUSTER_DNS}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
    errors
    log
}}
"""


def ctr(state: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return run(["ctr", "--address", state["containerd_sock"], "--namespace", "k8s.io", *args], **kw)


def import_image(state: dict, layout: Path, name: str) -> None:
    if not (layout / "index.json").exists():
        raise ClusterError(f"image {name} not built ({layout} missing; run: bash tests/cluster/build.sh)")
    t0 = time.time()
    tar = subprocess.Popen(["tar", "-C", str(layout), "-cf", "-", "."], stdout=subprocess.PIPE)
    p = subprocess.run(["ctr", "--address", state["containerd_sock"], "--namespace", "k8s.io",
                        "images", "import", "--no-unpack=false", "-"], stdin=tar.stdout,
                       capture_output=True, text=True)
    if tar.stdout is not None:
        tar.stdout.close()
    tar.wait()
    if p.returncode != 0:
        # older ctr has no --no-unpack flag form with a value; retry plainly
        tar = subprocess.Popen(["tar", "-C", str(layout), "-cf", "-", "."], stdout=subprocess.PIPE)
        p = subprocess.run(["ctr", "--address", state["containerd_sock"], "--namespace", "k8s.io",
                            "images", "import", "-"], stdin=tar.stdout, capture_output=True, text=True)
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait()
    if p.returncode != 0:
        raise ClusterError(f"ctr images import {name} failed: {p.stderr.strip()}")
    if name not in ctr(state, "images", "ls", "-q").stdout.split():
        raise ClusterError(f"image {name} not listed after import")
    log(f"imported {name} in {time.time() - t0:.1f}s")


def up_node(state: dict) -> None:
    tools = require_host_tools(["containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip",
                                "tar", "nsenter", "mount"])
    require_bins(["kubelet", "kube-proxy", "coredns"])
    if not Path("/usr/lib/cni/bridge").exists():
        raise ClusterError("CNI plugins missing (/usr/lib/cni/bridge): apt-get install containernetworking-plugins")
    d = STATE_DIR / "node"
    cd = d / "containerd"
    (cd / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
    (cd / "certs.d").mkdir(parents=True, exist_ok=True)
    (d / "pod-logs").mkdir(parents=True, exist_ok=True)
    (cd / "config.toml").write_text(containerd_config(cd))
    conf = cni_config(cd)
    (cd / "cni" / "net.d" / "10-rk8s.conflist").write_text(json.dumps(conf, indent=2))
    # For dnsPolicy Default Pods (and the kubelet's own view): no DNS server answers here.
    # ClusterFirst Pods get CoreDNS (CLUSTER_DNS) instead; it answers cluster names only.
    (d / "resolv.conf").write_text("# runnable-k8s test cluster: no DNS server, nothing leaves this machine\n"
                                   "nameserver 127.0.0.1\noptions ndots:1 timeout:1 attempts:1\n")
    state["containerd_sock"] = str(cd / "containerd.sock")
    state["node_dir"] = str(d)
    save_state(state)
    setup_host_network(state)
    start_coredns(state)  # needs only the API and the bridge address

    spawn(state, "containerd", [tools["containerd"], "--config", str(cd / "config.toml"), "--log-level", "warn"])
    wait_for("containerd socket", lambda: ctr(state, "version", check=False).returncode == 0, 30, state, "containerd")
    log("containerd ready")
    import_image(state, IMAGES / "pause.oci", PAUSE_IMAGE)
    try:
        import_image(state, WORKER_LAYOUT, WORKER_IMAGE)
        state["worker_image"] = WORKER_IMAGE
    except ClusterError as e:
        log(f"worker image not available: {e}")
        state["worker_image_error"] = str(e)
    save_state(state)

    state["kubelet_port"], state["kubelet_healthz_port"] = free_port(), free_port()
    (d / "kubelet-config.json").write_text(json.dumps(kubelet_config(state, d), indent=2))
    spawn(state, "kubelet", [
        str(BIN / "kubelet"), f"--config={d / 'kubelet-config.json'}",
        f"--kubeconfig={STATE_DIR / 'kubelet.kubeconfig'}", f"--root-dir={d / 'kubelet'}",
        f"--hostname-override={NODE_NAME}", f"--node-ip={POD_GATEWAY}", "--v=1",
    ])
    t_kubelet = time.time()
    # kube-proxy reads the node's addresses at start: wait for the kubelet to register it.
    wait_for(f"node {NODE_NAME} registered", lambda: api_get(state, f"/api/v1/nodes/{NODE_NAME}")[0] == 200,
             60, state, "kubelet", interval=0.3)
    start_kube_proxy(state)

    def node_ready():
        code, body = api_get(state, f"/api/v1/nodes/{NODE_NAME}")
        if code != 200:
            return False
        conds = {c["type"]: c for c in json.loads(body)["status"].get("conditions", [])}
        ready = conds.get("Ready", {})
        state["node_ready_message"] = ready.get("message", "")
        return ready.get("status") == "True"
    try:
        wait_for(f"node {NODE_NAME} Ready", node_ready, 120, state, "kubelet", interval=1)
    except ClusterError as e:
        raise ClusterError(f"{e}\nlast Ready message: {state.get('node_ready_message')}") from None
    log(f"node {NODE_NAME} Ready {time.time() - t_kubelet:.1f}s after the kubelet started")
    wait_kube_proxy(state)
    state["tiers"] = sorted(set(state.get("tiers", [])) | {"node"})
    save_state(state)


def start_coredns(state: dict) -> None:
    for path, obj in COREDNS_RBAC:
        code, body = api_get(state, path, method="POST", body=obj)
        if code not in (201, 409):
            raise ClusterError(f"creating {obj['kind']} system:coredns failed ({code}): {body[:500]!r}")
    state["coredns_ready_port"] = free_port()
    conf = STATE_DIR / "Corefile"
    conf.write_text(corefile(state))
    state["corefile"] = str(conf)
    t0 = time.time()
    spawn(state, "coredns", [str(BIN / "coredns"), "-conf", str(conf), "-pidfile", ""])
    url = f"http://127.0.0.1:{state['coredns_ready_port']}/ready"

    def ready():  # the ready plugin: 200 once the kubernetes plugin has synced with the API
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    wait_for("CoreDNS ready", ready, 60, state, "coredns", interval=0.1)
    log(f"coredns ready on {CLUSTER_DNS}:53 (cluster.local only) {time.time() - t0:.1f}s after start")


def start_kube_proxy(state: dict) -> None:
    state["kube_proxy_healthz_port"], state["kube_proxy_metrics_port"] = free_port(), free_port()
    conf = STATE_DIR / "kube-proxy-config.json"
    conf.write_text(json.dumps(kube_proxy_config(state), indent=2))
    state["t_kube_proxy"] = time.time()
    spawn(state, "kube-proxy", [str(BIN / "kube-proxy"), f"--config={conf}", "--v=1"])


def wait_kube_proxy(state: dict) -> None:
    """Healthy once its first sync wrote the rules; then our DROP rules go back in front."""
    url = f"http://127.0.0.1:{state['kube_proxy_healthz_port']}/healthz"

    def synced():
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status != 200:
                return False
        return "KUBE-FORWARD" in run(["iptables", "-w", "-S", "FORWARD"]).stdout
    wait_for("kube-proxy's first sync", synced, 60, state, "kube-proxy", interval=0.1)
    pin_host_rules(state)
    log(f"kube-proxy synced (iptables mode) {time.time() - state['t_kube_proxy']:.1f}s after start")


def _mounts_under(prefix: str) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
            out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


def _cgroup_procs(root: Path) -> set[int]:
    pids: set[int] = set()
    for f in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(x) for x in f.read_text().split())
    return pids


def down_node(state: dict) -> list[str]:
    problems: list[str] = []
    d = Path(state.get("node_dir", STATE_DIR / "node"))
    pids = state.get("pids", {})
    # kube-proxy first: stopped, it no longer rewrites the chains the host teardown removes.
    for name in ("kube-proxy", "coredns", "kubelet"):
        if name in pids:
            stop_pid(name, pids[name])
    before = set(state.get("host", {}).get("cgroups_before", []))
    # Every container process (pause included) sits in the kubelet's /kubepods cgroups: kill them.
    t0 = time.time()
    while time.time() - t0 < 10:
        procs = set()
        for kp in CGROUP_ROOT.glob("*/kubepods"):
            if str(kp) not in before:
                procs |= _cgroup_procs(kp)
        if not procs:
            break
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if "containerd" in pids and pid_alive(pids["containerd"]["pid"]):
        for t in ctr(state, "tasks", "ls", "-q", check=False).stdout.split():
            ctr(state, "tasks", "delete", "--force", t, check=False)
        stop_pid("containerd", pids["containerd"])
    sock = state.get("containerd_sock", str(d / "containerd" / "containerd.sock"))
    # Shims (containerd-shim-runc-v2 -namespace k8s.io -address OUR_SOCKET ...) outlive the daemon.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in cmd:
                log(f"killing leftover shim pid {proc.name}")
                os.kill(int(proc.name), signal.SIGKILL)
    log(f"containers and containerd stopped in {time.time() - t0:.1f}s")
    with phase("runc cleanup + unmounts"):
        _runc_and_mounts(d, problems)
    with phase("cgroup removal"):
        _remove_cgroups(before, problems)
    with phase("host network teardown"):
        problems += teardown_host_network(state)
    with phase("host files cleanup"):
        _host_files_cleanup(state)
    return problems


def _runc_and_mounts(d: Path, problems: list[str]) -> None:
    runc_root = d / "containerd" / "runc"
    if runc_root.exists():
        for ns_dir in runc_root.iterdir():
            p = run(["runc", "--root", str(ns_dir), "list", "-q"], check=False)
            for cid in p.stdout.split():
                run(["runc", "--root", str(ns_dir), "delete", "-f", cid], check=False)
    for mp in _mounts_under(str(STATE_DIR)):
        if mp == str(STATE_DIR):
            continue  # the state tmpfs itself goes last, in down()
        if run(["umount", mp], check=False).returncode != 0:
            run(["umount", "-l", mp], check=False)
    left = [m for m in _mounts_under(str(STATE_DIR)) if m != str(STATE_DIR)]
    if left:
        problems.append(f"mounts left: {left}")


def _remove_cgroups(before: set, problems: list[str]) -> None:
    for kp in CGROUP_ROOT.glob("*/kubepods"):
        if str(kp) in before:
            continue
        for sub in sorted((p for p in kp.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            kp.rmdir()
        if kp.exists():
            problems.append(f"cgroup left: {kp}")


def _host_files_cleanup(state: dict) -> None:
    host = state.get("host", {})
    # Files the kubelet/CNI keep at fixed host paths.
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(str(STATE_DIR)):
                    link.unlink()
    for p, existed_key in (("/var/log/containers", "var_log_containers_existed"),
                           ("/var/log/pods", "var_log_pods_existed")):
        if not host.get(existed_key, True):
            with contextlib.suppress(OSError):
                os.rmdir(p)
    results = Path("/var/lib/cni/results")
    if results.is_dir():
        for f in results.glob(f"{CNI_NETWORK}-*"):
            f.unlink()
    if not host.get("var_lib_cni_existed", True):
        shutil.rmtree("/var/lib/cni", ignore_errors=True)
    if not host.get("var_lib_kubelet_existed", True):
        shutil.rmtree("/var/lib/kubelet", ignore_errors=True)
    if not host.get("run_containerd_existed", True):
        # containerd's fixed shim-socket folder; the shims remove their sockets as they exit.
        deadline = time.time() + 5
        while Path("/run/containerd").exists() and time.time() < deadline:
            for sub in ("s", "fifo", "runc/k8s.io", "runc", ""):
                with contextlib.suppress(OSError):
                    os.rmdir(Path("/run/containerd") / sub)
            time.sleep(0.1)


# ------------------------------------------------------------------------------ public
def status() -> dict:
    state = load_state()
    if not state:
        return {"up": False, "tiers": [], "reason": f"no cluster state in {STATE_DIR}"}
    alive = {n: pid_alive(i["pid"], os.path.basename(i["exe"])) for n, i in state.get("pids", {}).items()}
    tiers = []
    cp = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    if "control-plane" in state.get("tiers", []) and all(alive.get(n) for n in cp):
        with contextlib.suppress(Exception):
            if api_get(state, "/readyz", timeout=3)[0] == 200:
                tiers.append("control-plane")
    node_alive = all(alive.get(n) for n in ("kubelet", "containerd", "kube-proxy", "coredns"))
    if "control-plane" in tiers and "node" in state.get("tiers", []) and node_alive:
        with contextlib.suppress(Exception):
            code, body = api_get(state, f"/api/v1/nodes/{NODE_NAME}", timeout=3)
            conds = {c["type"]: c["status"] for c in json.loads(body)["status"]["conditions"]} if code == 200 else {}
            if conds.get("Ready") == "True":
                tiers.append("node")
    return {"up": bool(tiers), "tiers": tiers, "processes": alive, "state_dir": str(STATE_DIR),
            "kubeconfig": state.get("kubeconfig"), "server": state.get("server"),
            "worker_image": state.get("worker_image"), "node": NODE_NAME if "node" in tiers else None,
            "failed": state.get("failed", {})}


def up(tier: str = "node") -> dict:
    state = load_state()
    st = status()
    if state and not st["up"]:
        log("stale cluster state found (nothing up); tearing it down first")
        down()
        state = {}
    if not state:
        if STATE_DIR.exists():
            if _mounts_under(str(STATE_DIR)):
                raise ClusterError(f"{STATE_DIR} still has mounts from an earlier cluster; "
                                   "run `python -m tests.cluster down` and check `mount`")
            run(["rm", "-rf", "--one-file-system", str(STATE_DIR)])
        STATE_DIR.mkdir(parents=True)
        # Everything of a cluster (etcd data, containerd's images and snapshots, kubelet volumes)
        # lives in memory: fast to write, and teardown is one unmount instead of deleting
        # tens of thousands of files on this machine's slow disk.
        tmpfs = run(["mount", "-t", "tmpfs", "-o", f"size={STATE_TMPFS_SIZE},mode=0755", "rk8s-state",
                     str(STATE_DIR)], check=False).returncode == 0 if STATE_TMPFS_SIZE != "0" else False
        state = {"versions": VERSIONS, "created": time.time(), "tmpfs": tmpfs}
        save_state(state)
    t0 = time.time()
    if "control-plane" not in st["tiers"]:
        up_control_plane(state)
    if tier == "node" and "node" not in status()["tiers"]:
        try:
            up_node(state)
        except ClusterError as e:
            state.setdefault("failed", {})["node"] = str(e)
            save_state(state)
            raise
    log(f"cluster up ({tier}) in {time.time() - t0:.1f}s; KUBECONFIG={state['kubeconfig']}")
    return status()


def down(keep_logs_to: Path | None = None) -> list[str]:
    state = load_state()
    if not state:
        return []
    with phase("node teardown"):
        problems = down_node(state) if state.get("node_dir") or "containerd" in state.get("pids", {}) else []
    for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        info = state.get("pids", {}).get(name)
        if info:
            # A throw-away cluster: no need to wait out the apiserver's graceful termination
            # (it can hold on for 15 s and more while long-running requests drain).
            stop_pid(name, info, timeout=5)
    for name, info in state.get("pids", {}).items():
        if pid_alive(info["pid"], os.path.basename(info["exe"])):
            problems.append(f"{name} (pid {info['pid']}) still running")
    if keep_logs_to and (STATE_DIR / "logs").exists():
        with phase("keeping the logs"):
            shutil.rmtree(keep_logs_to, ignore_errors=True)
            shutil.copytree(STATE_DIR / "logs", keep_logs_to)
    mounts = _mounts_under(str(STATE_DIR))
    if mounts == [str(STATE_DIR)]:  # the state tmpfs
        if run(["umount", str(STATE_DIR)], check=False).returncode != 0:
            run(["umount", "-l", str(STATE_DIR)], check=False)
        mounts = _mounts_under(str(STATE_DIR))
    if not mounts:
        with phase(f"removing {STATE_DIR}"):
            run(["rm", "-rf", "--one-file-system", str(STATE_DIR)], check=False)
    else:
        problems.append(f"kept {STATE_DIR}: mounts remain: {mounts}")
    for p in problems:
        log("teardown problem: " + p)
    log("cluster down" + (" (with problems)" if problems else ", nothing left behind"))
    return problems


def leftovers() -> list[str]:
    """What a finished teardown must not leave: used by ci.sh and the tests' own check."""
    found = []
    if _mounts_under(str(STATE_DIR)):
        found.append(f"mounts under {STATE_DIR}")
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"link {BRIDGE}")
    if run(["ip", "route", "show", SERVICE_CIDR], check=False).stdout.strip():
        found.append(f"route {SERVICE_CIDR}")
    if run(["iptables", "-S", "FORWARD"], check=False).stdout.count(POD_CIDR):
        found.append("iptables FORWARD rules for the pod range")
    if run(["iptables", "-S", "INPUT"], check=False).stdout.count(f"{POD_GATEWAY}/32"):
        found.append(f"iptables INPUT rule for {POD_GATEWAY}")
    # kube-proxy's own chains (no other kube-proxy runs on a machine that runs this cluster)
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter", "mangle"):
            chains = [line.split()[1] for line in run([tool, "-t", table, "-S"], check=False).stdout.splitlines()
                      if line.startswith("-N KUBE-")]
            if chains:
                found.append(f"{tool} {table} chains: {' '.join(chains[:8])}{' ...' if len(chains) > 8 else ''}")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                # a path under them (not the lock file /tmp/rk8s-cluster.lock of a queued run)
                if f"{STATE_DIR}/".encode() in cmd or f"{BIN}/".encode() in cmd:
                    shown = cmd.replace(b"\0", b" ")[:120].decode(errors="replace")
                    found.append(f"process {proc.name}: {shown}")
    return found
