"""``pool="k8s://NAMESPACE/RELEASE"`` on the real test cluster: a warm call from the host to a
broker Pod through the API server's port-forward, and a reconnect after the Pod is replaced."""

from __future__ import annotations

import socket
import time

import pytest
from kubernetes.client.exceptions import ApiException
from langchain_core.runnables import RunnableLambda

from pool import PoolUnavailable, RunnableK8s
from pool.client.connection import Connection
from pool.k8s.portforward import BrokerForward, parse_k8s_address
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

RELEASE = "demo"


def broker_pod(name: str, image: str) -> dict:
    """A broker and one worker in one Pod (the worker reaches the broker on the Pod's loopback)."""
    labels = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "broker"}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "broker", "image": image, "imagePullPolicy": "Never",
                 "command": ["python", "-m", "pool", "broker", "--bind", "tcp://0.0.0.0:5555", "--insecure"],
                 "ports": [{"name": "zmq", "containerPort": 5555}],
                 "readinessProbe": {"tcpSocket": {"port": "zmq"}, "periodSeconds": 1}},
                {"name": "worker", "image": image, "imagePullPolicy": "Never",
                 "command": ["python", "-m", "worker", "--connect", "tcp://127.0.0.1:5555", "--slots", "2"]},
            ],
        },
    }


def wait_ready(core, namespace, name, timeout=90):
    wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                         for c in core.read_namespaced_pod(name, namespace).status.conditions or []),
             timeout, f"Pod {name} to be Ready", interval=0.5)


def pod_exists(core, namespace, name) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def call_until_served(runnable, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return runnable.invoke(None)
        except PoolUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_parse_k8s_address():
    assert parse_k8s_address("k8s://team-a/prod") == ("team-a", "prod")
    with pytest.raises(ValueError):
        parse_k8s_address("k8s://only-namespace")


def test_a_warm_call_reaches_a_broker_pod_through_port_forward_and_survives_its_replacement(k8s_node, k8s_namespace):
    core = k8s_node.control_plane.core()
    core.create_namespaced_pod(k8s_namespace, broker_pod("broker-a", k8s_node.worker_image))
    wait_ready(core, k8s_namespace, "broker-a")
    address, kubeconfig = f"k8s://{k8s_namespace}/{RELEASE}", k8s_node.control_plane.kubeconfig
    remote = RunnableK8s(bound=RunnableLambda(lambda _: socket.gethostname()), pool=address, mode="warm",
                         k8s_config=kubeconfig, connect_timeout=10)
    forwards: list[BrokerForward] = []
    try:
        assert call_until_served(remote) == "broker-a"
        forwards.append(BrokerForward.shared(address, kubeconfig))  # the one the first call opened

        # A graceful delete (the Pod's 1 s grace): the API object goes only once the kubelet has
        # stopped its containers. A forced one (grace 0) removed the object at once while broker-a's
        # container still served the open port-forward for a moment, and a call after broker-b was
        # Ready once got broker-a's answer.
        core.delete_namespaced_pod("broker-a", k8s_namespace)
        wait_for(lambda: not pod_exists(core, k8s_namespace, "broker-a"), 60, "Pod broker-a to be gone", interval=0.5)
        core.create_namespaced_pod(k8s_namespace, broker_pod("broker-b", k8s_node.worker_image))
        wait_ready(core, k8s_namespace, "broker-b")
        assert call_until_served(remote) == "broker-b"  # the same RunnableK8s reconnected by itself
    finally:
        # The shared connection and the forward it goes through are this test's to close.
        for forward in forwards:
            Connection.close_all(forward.local_address)
            forward.close()


def test_no_broker_gives_pool_unavailable_naming_the_labels(k8s_control_plane, k8s_namespace):
    remote = RunnableK8s(bound=RunnableLambda(lambda x: x), pool=f"k8s://{k8s_namespace}/absent", mode="warm",
                         k8s_config=k8s_control_plane.kubeconfig)
    with pytest.raises(PoolUnavailable, match=r"app\.kubernetes\.io/instance=absent"):
        remote.invoke(1)
