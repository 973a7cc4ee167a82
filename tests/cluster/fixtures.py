"""pytest plugin: fixtures for the real single-node test cluster (see README.md here).

Load it with ``pytest_plugins = ["tests.cluster.fixtures"]`` in tests/conftest.py
(tests/cluster/conftest.py loads it by itself when that has not happened).

Session fixtures
  k8s_control_plane -> ControlPlane(kubeconfig, server, api_client, ...): a ready API server
                       (etcd, apiserver, controller-manager, scheduler). No node needed.
  k8s_node          -> Node(name, worker_image, control_plane, ...): the control plane plus one
                       Ready node (containerd + kubelet + kube-proxy + CoreDNS) holding the
                       worker image; Pods reach Services by ClusterIP and by name.
  helm_bin          -> str: path of the pinned helm CLI (no cluster needed).
Function fixtures
  k8s_namespace     -> str: a fresh namespace on the control plane, deleted afterwards.

A fixture whose tier is not up (and cannot be started) skips the test with the reason; it
never errors.  If no cluster is up but everything is built, the first fixture starts the tier
for the session and stops it at the end (RUNNABLE_K8S_CLUSTER_AUTOSTART=0 turns that off;
tests/cluster/ci.sh starts the cluster itself and sets it to 0).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from . import cluster

WORKER_IMAGE = "runnable-k8s-worker:latest"  # as a Pod spec names it (imagePullPolicy Never/IfNotPresent)


@dataclass
class ControlPlane:
    kubeconfig: str            # admin kubeconfig (system:masters), for the kubernetes client and helm
    server: str                # https://127.0.0.1:PORT
    api_client: Any            # kubernetes.client.ApiClient bound to that kubeconfig
    state_dir: str
    service_cidr: str = cluster.SERVICE_CIDR

    def core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api_client)

    def apps(self):
        from kubernetes import client
        return client.AppsV1Api(self.api_client)

    def service_account_configuration(self, namespace: str, account: str):
        """A client Configuration acting as ServiceAccount ``account`` (a TokenRequest token),
        for tests of what RBAC lets it do."""
        from kubernetes import client
        token = self.core().create_namespaced_service_account_token(
            account, namespace, client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600))).status.token
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = self.api_client.configuration.ssl_ca_cert
        configuration.api_key = {"authorization": "Bearer " + token}
        return configuration


@dataclass
class Node:
    name: str                  # the Node object's name ("localhost")
    worker_image: str          # "runnable-k8s-worker:latest" (never pulled: use pullPolicy Never/IfNotPresent)
    control_plane: ControlPlane
    pod_cidr: str = cluster.POD_CIDR
    host_ip: str = cluster.POD_GATEWAY   # the node's InternalIP (the pod bridge's host address)
    service_cidr: str = cluster.SERVICE_CIDR  # ClusterIPs: kube-proxy DNATs them for Pods
    cluster_dns: str = cluster.CLUSTER_DNS    # CoreDNS (cluster.local only), ClusterFirst Pods' nameserver
    cluster_domain: str = cluster.CLUSTER_DOMAIN
    extra: dict = field(default_factory=dict)


def _skip_reason(tier: str) -> str:
    parts = [f"test cluster tier '{tier}' is not up"]
    env_reason = os.environ.get("RUNNABLE_K8S_CLUSTER_UNAVAILABLE")
    if env_reason:
        parts.append(env_reason)
    failed = cluster.load_state().get("failed", {})
    if failed.get(tier):
        parts.append(f"{tier} tier failed to start: {failed[tier].splitlines()[0][:300]}")
    if len(parts) == 1:
        parts.append("start it with `python -m tests.cluster up` (build first: `bash tests/cluster/build.sh`)")
    return "; ".join(parts)


class _Autostart:
    """What this test session started, shared by every fixture (one cluster per machine)."""

    started: ClassVar[bool] = False
    errors: ClassVar[dict[str, str]] = {}
    lock: ClassVar[cluster.ClusterLock | None] = None


def _ensure_tier(tier: str) -> None:
    # One cluster per machine: this session uses it exclusively (ci.sh holds the lock for us).
    if _Autostart.lock is None:
        lock = cluster.ClusterLock(f"pytest session, pid {os.getpid()}")
        if not lock.acquire(timeout=float(os.environ.get("RUNNABLE_K8S_CLUSTER_LOCK_WAIT", "30"))):
            pytest.skip(f"the test cluster is in use by another run ({lock.holder()})")
        _Autostart.lock = lock
    if tier in cluster.status()["tiers"]:
        return
    if os.environ.get("RUNNABLE_K8S_CLUSTER_AUTOSTART", "1") == "0":
        pytest.skip(_skip_reason(tier))
    if tier in _Autostart.errors:
        pytest.skip(f"test cluster tier '{tier}' could not be started: {_Autostart.errors[tier]}")
    if os.geteuid() != 0:
        pytest.skip(f"test cluster tier '{tier}' is not up, and starting it needs root")
    try:
        cluster.up(tier)
        _Autostart.started = True
    except Exception as e:  # noqa: BLE001 - any failure to start means: skip, with the reason
        _Autostart.errors[tier] = str(e).splitlines()[0][:400]
        pytest.skip(f"test cluster tier '{tier}' could not be started: {_Autostart.errors[tier]}")


@pytest.fixture(scope="session")
def k8s_control_plane():
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        pytest.skip("the kubernetes Python client is not installed")
    _ensure_tier("control-plane")
    st = cluster.status()
    from kubernetes import config
    api_client = config.new_client_from_config(config_file=st["kubeconfig"])
    try:
        yield ControlPlane(kubeconfig=st["kubeconfig"], server=st["server"], api_client=api_client,
                           state_dir=st["state_dir"])
    finally:
        api_client.close()
        if _Autostart.started:
            cluster.down()
            _Autostart.started = False
        if _Autostart.lock is not None:
            _Autostart.lock.release()
            _Autostart.lock = None


@pytest.fixture(scope="session")
def k8s_node(k8s_control_plane):
    _ensure_tier("node")
    st = cluster.status()
    if not st.get("worker_image"):
        err = cluster.load_state().get("worker_image_error", "not built")
        pytest.skip(f"test cluster node is up but the worker image is missing: {err}")
    return Node(name=st["node"], worker_image=WORKER_IMAGE, control_plane=k8s_control_plane)


@pytest.fixture(scope="session")
def helm_bin() -> str:
    path = cluster.BIN / "helm"
    if not os.access(path, os.X_OK):
        pytest.skip(f"helm CLI not built ({path}); run: bash tests/cluster/build.sh binaries")
    return str(path)


@pytest.fixture
def k8s_namespace(k8s_control_plane):
    from kubernetes import client
    core = client.CoreV1Api(k8s_control_plane.api_client)
    name = "t-" + uuid.uuid4().hex[:10]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"app.kubernetes.io/part-of": "runnable-k8s-tests"})))
    # Pods can be created only once the namespace's default ServiceAccount exists.
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.ApiException:
            time.sleep(0.2)
    yield name
    try:
        core.delete_namespace(name, grace_period_seconds=0, propagation_policy="Background")
    except client.ApiException:
        pass
