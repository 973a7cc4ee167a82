"""``pool="k8s://NAMESPACE/RELEASE"``: reach a pool's broker from outside the cluster.

A local TCP listener on 127.0.0.1 stands in for the broker. Each connection ZeroMQ makes to it is
carried to a broker Pod through the Kubernetes API's port-forward (as ``kubectl port-forward``
does), using the kubeconfig the kubernetes client reads. When the forward drops (the Pod was
replaced, the API server restarted), ZeroMQ reconnects to the listener, which finds the broker
again and opens a new forward: the client reconnects by itself.

The broker Pods are found by the chart's labels: ``app.kubernetes.io/instance=RELEASE`` and
``app.kubernetes.io/component=broker``, port named ``zmq`` (5555 when unnamed).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Any, ClassVar

from kubernetes import client, config
from kubernetes.stream import portforward

from pool.errors import PoolUnavailable
from pool.k8s.address import parse_k8s_address
from pool.k8s.api import api_configuration, api_error
from worker import defaults

log = logging.getLogger("runnable_k8s.portforward")



def broker_selector(release: str) -> str:
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component=broker"


class BrokerForward:
    """A 127.0.0.1 listener whose connections are port-forwarded to a broker Pod."""

    _shared: ClassVar[dict[tuple[str, int], BrokerForward]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def shared(cls, address: str, k8s_config: Any = None) -> BrokerForward:
        key = (address, id(k8s_config))
        with cls._shared_lock:
            forward = cls._shared.get(key)
            if forward is None or forward.closed:
                forward = cls(address, k8s_config)
                cls._shared[key] = forward
            return forward

    def __init__(self, address: str, k8s_config: Any = None) -> None:
        self.namespace, self.release = parse_k8s_address(address)
        try:
            self.configuration = api_configuration(k8s_config)
            self.core = client.CoreV1Api(client.ApiClient(self.configuration))
        except config.ConfigException as exc:
            raise PoolUnavailable(f"cannot reach {address}: no Kubernetes configuration ({exc}); "
                                  "set KUBECONFIG or pass k8s_config=") from exc
        self.closed = False
        self._failing = False  # the last forward attempt found no broker Pod, or could not reach it
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.local_address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self.find_broker()  # fail now, with a clear message, if there is no broker to reach
        threading.Thread(target=self._accept, daemon=True, name=f"runnable-k8s-forward {address}").start()

    def find_broker(self) -> tuple[str, int]:
        """A running, ready broker Pod of the release and its ZeroMQ port."""
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=broker_selector(self.release)).items
        except Exception as exc:  # ApiException and connection errors alike: auto mode falls back on them
            raise api_error(exc, "list", "pods", self.namespace, error=PoolUnavailable) from exc
        for pod in pods:
            status, meta = pod.status, pod.metadata
            if status is None or meta is None or not meta.name:
                continue
            ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
            if status.phase == "Running" and ready and meta.deletion_timestamp is None:
                return meta.name, _zmq_port(pod)
        raise PoolUnavailable(
            f"no ready broker Pod of release {self.release!r} in namespace {self.namespace!r} (looked for "
            f"labels {broker_selector(self.release)}). Is the chart installed (`helm install {self.release} "
            f"charts/worker-pool -n {self.namespace}`) and its broker Pod ready (`kubectl get pods -n "
            f"{self.namespace}`)?"
        )

    def _accept(self) -> None:
        while not self.closed:
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._carry, args=(local,), daemon=True).start()

    def _carry(self, local: socket.socket) -> None:
        """Pump one ZeroMQ connection to a broker Pod and back until either side closes."""
        try:
            pod, port = self.find_broker()
            # A client of its own: the stream helper swaps its ApiClient's request method while it
            # connects, so concurrent forwards must not share one (kubernetes-client/python#928).
            core = client.CoreV1Api(client.ApiClient(self.configuration))
            forward = portforward(core.connect_get_namespaced_pod_portforward, pod, self.namespace,
                                  ports=str(port))
            remote = forward.socket(port)
        except Exception as exc:  # noqa: BLE001 - ZeroMQ will reconnect and we try again
            # ZeroMQ retries every 100 ms while the broker Pod is replaced: one warning per outage.
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(level, "port-forward to the broker of %s/%s failed (retrying while ZeroMQ reconnects): %s",
                    self.namespace, self.release, exc)
            local.close()
            return
        if self._failing:
            self._failing = False
            log.info("port-forwarding to the broker of %s/%s again, Pod %s", self.namespace, self.release, pod)
        log.info("port-forwarding 127.0.0.1 -> %s/%s:%d", self.namespace, pod, port)
        try:
            pump(local, remote)
        finally:
            for end in (local, remote):
                try:
                    end.close()
                except OSError:
                    pass
            forward.close()

    def close(self) -> None:
        self.closed = True
        self._listener.close()


def pump(a: Any, b: Any) -> None:
    """Carry bytes both ways between two sockets until either side closes or fails (a failed send
    ends the connection like a failed receive, instead of escaping the forwarding thread)."""
    while True:
        readable, _, _ = select.select([a, b], [], [], 1.0)
        for source in readable:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                (b if source is a else a).sendall(data)
            except OSError:
                return


def _zmq_port(pod: Any) -> int:
    for container in pod.spec.containers:
        for port in container.ports or []:
            if port.name == "zmq":
                return int(port.container_port)
    return defaults.BROKER_PORT
